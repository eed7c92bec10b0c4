"""`slimlm quantize --rotate hadamard`: the checkpoint loads untied and decodes through the engine (C
kernel where it runs) with the same greedy tokens as the PyTorch path."""

from __future__ import annotations

import json

import pytest

from slimlm.cli import main
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams


def test_rotated_checkpoint_loads_and_decodes(tiny_model_dir, tmp_path):
    out = tmp_path / "rot"
    args = ["quantize", "--model", str(tiny_model_dir), "--method", "gptq", "--rotate", "hadamard",
            "--zero", "float", "--embedding-bits", "8", "--calib-samples", "2", "--calib-seqlen", "64",
            "--calib-file", str(tiny_model_dir / "config.json"), "-q", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["rotate"]["kind"] == "hadamard"
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    runs = {}
    for kernel in ("auto", "torch"):
        llm = LLM(str(out), dtype="bfloat16", decode_kernel=kernel, kv_cache_tokens=256, max_num_seqs=2)
        assert (llm.engine.decode_backend == "C kernel") == (kernel == "auto")
        runs[kernel] = [o.token_ids for o in llm.generate(["hello there", "abc"], params)]
    assert runs["auto"] == runs["torch"]


def test_an_unknown_rotation_is_refused_by_the_parser(tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tiny_model_dir), "--rotate", "sideways", "--out", "/tmp/never"])
    assert "invalid choice: 'sideways'" in capsys.readouterr().err
