"""`slimlm generate` output: logprobs (text and --json) against transformers, and the start-up report."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.cli import build_parser, main
from slimlm.engine.llm import LLM
from slimlm.errors import SlimlmError

PROMPT = "The capital of France is"
OPTIONS = ["--dtype", "float32", "--kv-cache-tokens", "256", "--max-tokens", "3", "--quiet"]


@pytest.fixture
def gen(tiny_model_dir):
    return ["generate", PROMPT, "--model", str(tiny_model_dir), *OPTIONS]


def _reference_logprobs(model_dir, token_ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each generated position (teacher-forced on our tokens)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    prompt = tokenizer(PROMPT).input_ids
    ids = torch.tensor([prompt + token_ids])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1), tokenizer


def test_json_logprobs_match_transformers(tiny_model_dir, gen, capsys):
    assert main([*gen, "--logprobs", "3", "--json", "--ignore-eos"]) == 0
    record = json.loads(capsys.readouterr().out)
    entries = record["logprobs"]
    assert len(entries) == record["completion_tokens"] == 3
    ref, tokenizer = _reference_logprobs(tiny_model_dir, [e["token_id"] for e in entries])
    for row, entry in zip(ref, entries, strict=True):
        assert entry["logprob"] == pytest.approx(row[entry["token_id"]].item(), abs=2e-3)
        top = torch.topk(row, 3)
        assert [t["token_id"] for t in entry["top_logprobs"]] == top.indices.tolist()
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=2e-3)
        assert entry["token"] == tokenizer.decode([entry["token_id"]])
    assert "".join(e["token"] for e in entries) == record["text"]


def test_text_output_prints_a_logprob_line_per_token(gen, capsys):
    assert main([*gen, "--logprobs", "2", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    text, table = out.split("--- logprobs\n")
    lines = table.strip().splitlines()
    assert len(lines) == 3 and all(line.count("|") == 1 and line.count(", ") >= 1 for line in lines)
    assert main([*gen[:2], PROMPT, *gen[2:], "--logprobs", "2"]) == 0  # two prompts: the batch path
    assert capsys.readouterr().out.count("--- logprobs") == 2


def test_logprobs_with_beams_is_refused(gen, capsys):
    assert main([*gen, "--logprobs", "2", "--num-beams", "2"]) == 2
    assert "beam search" in capsys.readouterr().err


def test_report_for_a_pool_smaller_than_one_context(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=64, block_size=16)
    text = llm.memory_report_text()
    assert "max 0 sequences" not in text
    assert "one sequence can have up to 64 tokens" in text
    big = LLM.from_loaded(smollm, kv_cache_tokens=2 * 8192 + 16, block_size=16, max_model_len=8192)
    assert "max 2 sequences at 8192 tokens" in big.memory_report_text()


def test_context_error_names_an_option_generate_has(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=64, max_model_len=8)
    with pytest.raises(SlimlmError) as err:
        llm.generate("one two three four five six seven eight nine ten")
    message = str(err.value)
    assert "truncation" not in message
    flags = [w.strip(",;()") for w in message.split() if w.startswith("--")]
    assert flags
    usage = build_parser("generate").commands["generate"].format_help()
    assert all(flag in usage for flag in flags), flags
