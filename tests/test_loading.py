"""Loading: the embedded GGUF against transformers, HF directories (single and sharded), bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError
from slimlm.loading import load
from tests.tiny_models import make_hf_model

REFERENCE_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain what a hash table is in two sentences.",
    "List three colors of the rainbow.",
    "Why is the sky blue?",
]


def test_smollm_logits_match_transformers(smollm, hf_smollm):
    ids = torch.tensor([smollm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():
        ours = smollm.model.forward_dense(ids)
        ref = hf_smollm(ids).logits
    assert (ours - ref).abs().max() < 1e-3


def test_smollm_greedy_generations_match_transformers(smollm, hf_smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=1024)
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in REFERENCE_PROMPTS]
    ours = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0))
    for prompt, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf_smollm.generate(
                torch.tensor([prompt]),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=smollm.config.eos_token_ids,
                pad_token_id=2,
            )
        assert out.token_ids == ref[0, len(prompt) :].tolist()


def test_embedded_config_is_smollm2(smollm):
    cfg = smollm.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert smollm.model.lm_head.weight.data_ptr() == smollm.model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load_keeps_every_weight_in_that_dtype(dtype):
    loaded = load("smollm2-135m", dtype=dtype, progress=False)
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}


def _save_hf_dir(tmp_path, arch, shard: str | None):
    hf = make_hf_model(arch)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size=shard or "10GB")
    _write_tiny_tokenizer(tmp_path)
    return hf


def _write_tiny_tokenizer(path):
    """A 128-token byte-level BPE tokenizer (vocab matches the tiny models) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(126)}
    vocab.update({"<s>": 126, "</s>": 127})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
            }
        )
    )


@pytest.mark.parametrize("arch,shard", [("llama", None), ("qwen2", "60KB"), ("mistral", None)])
def test_hf_directory_loads_and_matches_transformers(tmp_path, arch, shard):
    hf = _save_hf_dir(tmp_path, arch, shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load(str(tmp_path), dtype="float32", progress=False)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.model.forward_dense(ids), hf(ids).logits, atol=1e-4)
    assert loaded.config.family == arch


# ---- bad input: one line, exit 2, no traceback, nothing written ----


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "slimlm.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def _assert_clean_error(result, fragment):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_cli_missing_path_is_a_one_line_error(tmp_path):
    _assert_clean_error(_cli("generate", "hi", "--model", str(tmp_path / "nope"), "-q"), "does not exist")


def test_bad_model_inputs_give_clear_errors(tmp_path):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(SlimlmError, match="config.json is missing"):
        load(str(not_a_model), progress=False)

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(
        SlimlmError, match="unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM"
    ):
        load(str(gpt2), progress=False)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    )
    with pytest.raises(SlimlmError, match="missing required keys: vocab_size, intermediate_size"):
        load(str(partial), progress=False)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    _save_hf_dir(tmp_path, "llama", None)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SlimlmError, match="truncated or corrupt"):
        load(str(tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_truncated_gguf_is_a_clear_error(tmp_path, smollm_path):
    broken = tmp_path / "broken.gguf"
    with open(smollm_path, "rb") as f:
        broken.write_bytes(f.read(3_000_000))
    result = _cli("generate", "hi", "--model", str(broken), "-q", cwd=tmp_path)
    _assert_clean_error(result, "broken.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_not_a_gguf_file(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(SlimlmError, match="not a readable GGUF"):
        load(str(junk), progress=False)
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"x")
    with pytest.raises(SlimlmError, match="not a .gguf file"):
        load(str(txt), progress=False)
