"""quantize / merge / train / bench outputs: never over their inputs, never half-written.

Reproduces issue 22 items 1 and 11: `merge ADAPTER --model D --output D --overwrite` replaced the base
model's weights; an interrupted quantize or merge left a directory whose load error blamed the tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.loading import load
from slimlm.output_dir import INCOMPLETE_MARKER
from slimlm.train.config import TrainConfig
from slimlm.train.trainer import Trainer
from tests.train.conftest import qa_records, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(tmp / "qa.jsonl", qa_records(16))
    cfg = TrainConfig(data=[str(data)], output_dir=str(tmp / "run"), model=str(tiny_model_dir), lr=2e-2,
                      batch_size=4, lora_rank=4, max_steps=2, progress=False, lora_targets=("q_proj", "v_proj"))  # fmt: skip
    Trainer(cfg).run()
    return tmp / "run"


@pytest.fixture
def base_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the base model: the test may try to overwrite it."""
    import shutil

    return Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))


@pytest.mark.parametrize("where", ["same", "inside", "parent", "adapter"])
def test_merge_refuses_an_output_over_its_inputs(adapter, base_copy, where, capsys):
    before, adapter_before = digest(base_copy), digest(adapter)
    out = {"same": base_copy, "inside": base_copy / "merged", "parent": base_copy.parent, "adapter": adapter}[
        where
    ]
    code = main(
        ["merge", str(adapter), "--model", str(base_copy), "--output", str(out), "--overwrite", "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --output") and err.count("\n") == 1, err
    assert ("adapter directory" if where == "adapter" else "overlaps the base model") in err
    assert digest(base_copy) == before and digest(adapter) == adapter_before
    assert not (base_copy / "merged").exists()


def test_interrupted_merge_leaves_nothing_and_keeps_old_files(adapter, base_copy, tmp_path, monkeypatch):
    import slimlm.train.merge as merge

    def interrupted(*args, **kwargs):  # Ctrl-C after the weights were written, before the tokenizer
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "_save_tokenizer", interrupted)
    args = ["merge", str(adapter), "--model", str(base_copy), "--quiet", "--output"]
    assert main([*args, str(tmp_path / "new")]) == 130
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"the previous merge")
    assert main([*args, str(old), "--overwrite"]) == 130
    assert (old / "model.safetensors").read_bytes() == b"the previous merge"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]

    monkeypatch.undo()
    assert main([*args, str(old), "--overwrite"]) == 0  # the complete merge replaces it, and loads
    assert not (old / INCOMPLETE_MARKER).exists()
    assert torch.isfinite(load(str(old), progress=False).model.forward_dense(torch.tensor([[5, 6, 7]]))).all()


def test_a_killed_writer_leaves_a_directory_that_loads_as_incomplete(tiny_model_dir, tmp_path, capsys):
    """SIGKILL (no cleanup runs): what remains is the staging directory, reported as incomplete."""
    script = (
        "import os, shutil, sys\n"
        "from slimlm.output_dir import staged_output\n"
        "with staged_output(sys.argv[2]) as tmp:\n"
        "    shutil.copy(os.path.join(sys.argv[1], 'model.safetensors'), tmp)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(tmp_path / "q")],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)  # fmt: skip
    assert done.returncode == -9
    assert not (tmp_path / "q").exists()
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".q.partial")]
    with pytest.raises(SlimlmError, match="incomplete output"):
        load(str(partial), progress=False)
    assert main(["generate", "hi", "--model", str(partial), "--quiet"]) == 2
    assert "incomplete output" in capsys.readouterr().err


def test_quantize_writes_through_a_staging_directory(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import slimlm.tokenizer.save as save

    args = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--group-size", "32", "--quiet"]
    monkeypatch.setattr(save, "save_tokenizer", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main([*args, "--out", str(tmp_path / "q")]) == 130
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "q")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert load(str(tmp_path / "q"), progress=False).config.quantization
    for out in (tiny_model_dir, tiny_model_dir / "sub", tiny_model_dir.parent):
        assert main([*args, "--out", str(out)]) == 2
        assert "overlaps the source model" in capsys.readouterr().err


def test_train_output_inside_the_base_model_is_refused(base_copy, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(8))
    before = digest(base_copy)
    for out in (base_copy, base_copy / "run"):
        code = main(["train", "--model", str(base_copy), "--data", str(data), "--output", str(out),
                     "--method", "full", "--max-steps", "1", "--overwrite", "--quiet"])  # fmt: skip
        assert code == 2 and "inside the base model" in capsys.readouterr().err
    assert digest(base_copy) == before


def test_bench_json_cannot_replace_the_model(base_copy, capsys):
    target = base_copy / "model.safetensors"
    assert main(["bench", "--model", str(base_copy), "--json", str(target), "--peers", "slimlm"]) == 2
    assert "overlaps the model" in capsys.readouterr().err
