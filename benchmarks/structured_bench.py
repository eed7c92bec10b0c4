"""Cost of constrained decoding in a batch: tokens/s of 16 requests with 0, 1 and 8 of them constrained.

Every request decodes exactly --max-tokens tokens (ignore_eos; the constrained ones follow a JSON
schema that cannot finish sooner: an array of at least 100 strings), so each configuration runs the
same steps at the same batch size and only the masking differs. Configurations are interleaved, and
each figure is the median of --repeats runs. Also reports the engine's own mask time per step.

    nice python benchmarks/structured_bench.py   # -> benchmarks/results/structured_bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.engine.structured import StructuredOutputs
from slimlm.loading import load

LONG_JSON = StructuredOutputs(json={"type": "array", "items": {"type": "string"}, "minItems": 100})


def run_once(llm: LLM, prompt: list[int], batch: int, constrained: int, max_tokens: int) -> dict:
    params = [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=0.8,
            seed=i,
            ignore_eos=True,
            structured_outputs=LONG_JSON if i < constrained else None,
        )
        for i in range(batch)
    ]
    c = llm.engine.constraints
    c.mask_seconds, c.mask_steps = 0.0, 0
    start = time.perf_counter()
    outs = llm.generate([prompt] * batch, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == batch * max_tokens, "a request ended early; the comparison needs equal work"
    return {
        "tok_s": tokens / wall,
        "mask_ms_per_step": 1e3 * c.mask_seconds / c.mask_steps if c.mask_steps else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--constrained", type=int, nargs="+", default=[0, 1, 8])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="benchmarks/results/structured_bench.json")
    args = ap.parse_args()
    loaded = load(None, dtype=args.dtype, progress=False)
    llm = LLM.from_loaded(
        loaded, max_num_seqs=args.batch, kv_cache_tokens=args.batch * 256, weights_layout="auto"
    )
    prompt = llm.chat_prompt([{"role": "user", "content": "List some fruits as a JSON array."}])
    llm.engine.constraints.check(LONG_JSON)  # tokenizer set-up and compile outside the timing
    run_once(llm, prompt, args.batch, 1, 4)  # warm-up
    runs: dict[int, list[dict]] = {k: [] for k in args.constrained}
    for _ in range(args.repeats):
        for k in args.constrained:
            runs[k].append(run_once(llm, prompt, args.batch, k, args.max_tokens))
            print(json.dumps({"constrained": k, **runs[k][-1]}), flush=True)
    base = statistics.median(r["tok_s"] for r in runs[args.constrained[0]])
    rows = []
    for k, rs in runs.items():
        tok_s = statistics.median(r["tok_s"] for r in rs)
        rows.append(
            {
                "constrained": k,
                "batch": args.batch,
                "tok_s_median": round(tok_s, 1),
                "tok_s_runs": [round(r["tok_s"], 1) for r in rs],
                "vs_unconstrained": round(tok_s / base, 3),
                "mask_ms_per_step_median": round(statistics.median(r["mask_ms_per_step"] for r in rs), 3),
            }
        )
        print(json.dumps(rows[-1]))
    result = {
        "benchmark": "structured_bench",
        "decode_kernel": llm.engine.decode_backend,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "note": "shared machine (other jobs running); configurations interleaved, medians of repeats",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
