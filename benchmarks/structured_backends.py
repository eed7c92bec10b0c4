"""llguidance against xgrammar on SmolLM2's tokenizer (49,152 tokens): set-up, compile and mask time.

For each schema: the time to turn it into a ready matcher (llguidance: grammar text + validation +
LLMatcher; xgrammar: compile_json_schema with a cold cache + GrammarMatcher; median of 3), then the
time to fill one token bitmask at each step while walking the tokens of a valid instance. Times are
the calling thread's CPU time (time.thread_time), so on a shared machine a step that lost the CPU to
another job does not count as slow; both engines run these calls on the calling thread (xgrammar with
max_threads=1).

    nice python benchmarks/structured_backends.py   # -> benchmarks/results/structured_backends.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SCHEMAS = {
    "person": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
            },
            "required": ["name", "age"],
        },
        {"name": "Ada Lovelace", "age": 36},
    ),
    "order (nested, arrays, enums, optional)": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
                "status": {"enum": ["new", "paid", "shipped"]},
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "sku": {"type": "string"},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                            "price": {"type": "number", "minimum": 0},
                        },
                        "required": ["sku", "qty"],
                    },
                },
                "note": {"type": "string"},
            },
            "required": ["id", "status", "items"],
        },
        {"id": "AB1234", "status": "paid", "items": [{"sku": "pen", "qty": 3, "price": 1.5}]},
    ),
    "wide (30 fields)": (
        {
            "type": "object",
            "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"]} for i in range(30)},
            "required": [f"field_{i}" for i in range(30)],
        },
        {f"field_{i}": [f"v{i}", i, i % 2 == 0][i % 3] for i in range(30)},
    ),
}


def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from slimlm.loading import default_model_path
    from slimlm.tokenizer import Tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_gguf_file(default_model_path()).backend)


def run_llguidance(tok, vocab: int, eos: int, schema: dict, tokens: list[int]) -> dict:
    import llguidance

    start = time.perf_counter()
    lltok = _LLTOK.get(id(tok))
    if lltok is None:
        lltok = _LLTOK[id(tok)] = llguidance.LLTokenizer(
            tok.backend_tokenizer.to_str(), n_vocab=vocab, eos_token=eos
        )
    setup = time.perf_counter() - start
    compiles = []
    for _ in range(3):
        start = time.thread_time()
        grammar = llguidance.grammar_from("json_schema", json.dumps(schema))
        assert not llguidance.LLMatcher.validate_grammar(grammar, lltok)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        compiles.append(time.thread_time() - start)
    compile_s = statistics.median(compiles)
    mask = torch.empty((1, (vocab + 31) // 32), dtype=torch.int32)
    steps = []
    for t in tokens:
        start = time.thread_time()
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.shape[1] * 4)
        steps.append(time.thread_time() - start)
        assert matcher.consume_token(t), "llguidance rejected a token of a valid instance"
    return _summary(setup, compile_s, steps)


def _summary(setup: float, compile_s: float, steps: list[float]) -> dict:
    return {
        "setup_s": round(setup, 3),
        "compile_ms": round(compile_s * 1e3, 3),
        "mask_ms_median": round(statistics.median(steps) * 1e3, 4),
        "mask_ms_mean": round(statistics.mean(steps) * 1e3, 4),
        "mask_ms_max": round(max(steps) * 1e3, 4),
    }


_LLTOK: dict = {}
_XGR: dict = {}


def run_xgrammar(tok, vocab: int, eos: int, schema: dict, tokens: list[int]) -> dict:
    import xgrammar as xgr

    start = time.perf_counter()
    info = _XGR.get(id(tok))
    if info is None:
        info = _XGR[id(tok)] = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos])
    setup = time.perf_counter() - start
    compiles = []
    for _ in range(3):
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        start = time.thread_time()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)
        matcher = xgr.GrammarMatcher(compiled)
        compiles.append(time.thread_time() - start)
    compile_s = statistics.median(compiles)
    mask = xgr.allocate_token_bitmask(1, vocab)
    steps = []
    for t in tokens:
        start = time.thread_time()
        matcher.fill_next_token_bitmask(mask, 0)
        steps.append(time.thread_time() - start)
        assert matcher.accept_token(t), "xgrammar rejected a token of a valid instance"
    return _summary(setup, compile_s, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/structured_backends.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = hf_tokenizer()
    vocab = len(tok)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for name, (schema, instance) in SCHEMAS.items():
        tokens = tok.encode(json.dumps(instance), add_special_tokens=False)
        row = {"schema": name, "tokens": len(tokens)}
        for backend, fn in (("llguidance", run_llguidance), ("xgrammar", run_xgrammar)):
            row[backend] = fn(tok, vocab, eos, schema, tokens)
        rows.append(row)
        print(json.dumps(row))
    result = {
        "benchmark": "structured_backends",
        "vocab": vocab,
        "machine": platform.processor() or platform.machine(),
        "note": "shared machine (other jobs running); CPU time of the calling thread; setup_s (wall) is "
        "paid once per tokenizer",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
