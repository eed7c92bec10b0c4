"""The synthetic checkpoint builder (slimlm/bench/models.py): a tiny config with SmolLM2's vocabulary,
built twice -> the same bytes; it loads in transformers and in slimlm with the same logits; sharded and
single-file builds hold the same tensors; the bench's --model plumbing refuses the GGUF-only variants."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from slimlm.bench.models import SMOLLM2_1_7B, build_synthetic, check_model_variants, tensor_specs
from slimlm.errors import SlimlmError

TINY = {**SMOLLM2_1_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_build_is_deterministic_and_loads_in_transformers_and_slimlm(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from slimlm.loading import load

    a = build_synthetic(tmp_path / "a", TINY, seed=3)
    b = build_synthetic(tmp_path / "b", TINY, seed=3)
    assert _digest(a / "model.safetensors") == _digest(b / "model.safetensors")
    other = build_synthetic(tmp_path / "c", TINY, seed=4)
    assert _digest(other / "model.safetensors") != _digest(a / "model.safetensors")

    # every tensor of the config, bf16, at the intended scales
    with safe_open(str(a / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        norm = f.get_tensor("model.norm.weight")
    assert names == {n for n, _ in tensor_specs(TINY)} and "lm_head.weight" not in names  # tied
    assert q.dtype == torch.bfloat16 and abs(q.float().std().item() - 0.02) < 2e-3
    assert torch.equal(norm, torch.ones_like(norm))

    hf = transformers.AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    loaded = load(str(a), dtype="float32", progress=False)
    ids = loaded.tokenizer.encode("The capital of France is", add_special_tokens=False)
    assert ids == transformers.AutoTokenizer.from_pretrained(a)("The capital of France is")["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits
        out = loaded.model.forward_dense(torch.tensor([ids]))
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()
    assert json.loads((a / "config.json").read_text())["rope_theta"] == 130000.0


def test_shards_hold_the_same_tensors_as_one_file(tmp_path):
    from slimlm.loading.safetensors_dir import iter_safetensors, safetensors_files

    one = build_synthetic(tmp_path / "one", TINY, seed=0)
    sharded = build_synthetic(tmp_path / "sharded", TINY, seed=0, shard_bytes=2 * 2**20)
    files = safetensors_files(sharded)
    assert len(files) > 1 and (sharded / "model.safetensors.index.json").is_file()
    whole = dict(iter_safetensors(safetensors_files(one)))
    for name, tensor in iter_safetensors(files):
        assert torch.equal(tensor, whole.pop(name)), name
    assert not whole


def test_bad_inputs_are_one_line_errors(tmp_path):
    build_synthetic(tmp_path / "x", TINY)
    with pytest.raises(SlimlmError, match="already exists"):
        build_synthetic(tmp_path / "x", TINY)
    with pytest.raises(SlimlmError, match="vocab_size"):
        build_synthetic(tmp_path / "y", {**TINY, "vocab_size": 128})
    with pytest.raises(SlimlmError, match="native run the embedded GGUF only"):
        check_model_variants(["bf16", "native"])


def test_merge_joins_per_hold_results_and_recomputes_the_ratios(tmp_path):
    from slimlm.bench.models import merge_variant_results

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"settings": {"runs": 1}, "variants": {
        "bf16": {"decode_tok_s": 10.0, "peak_rss_bytes": 400, "decode_tok_s_vs_bf16": 1.0}}}))  # fmt: skip
    b.write_text(json.dumps({"settings": {"runs": 1}, "variants": {
        "w4g64": {"decode_tok_s": 25.0, "peak_rss_bytes": 200, "peak_rss_bytes_vs_bf16": 9.9}}}))  # fmt: skip
    merged = merge_variant_results([a, b])
    w4 = merged["variants"]["w4g64"]
    assert w4["decode_tok_s_vs_bf16"] == 2.5 and w4["peak_rss_bytes_vs_bf16"] == 0.5  # stale 9.9 replaced
    assert [s["file"] for s in merged["settings"]["merged_from"]] == [str(a), str(b)]


def test_slimlm_bench_variants_with_a_model_refuses_the_gguf_only_ones_in_one_line(tmp_path):
    import subprocess
    import sys

    model = build_synthetic(tmp_path / "m", TINY)
    done = subprocess.run([sys.executable, "-m", "slimlm.cli", "bench", "--variants", "bf16,llama.cpp",
                           "--model", str(model)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "llama.cpp run the embedded GGUF only" in done.stderr and "Traceback" not in done.stderr
