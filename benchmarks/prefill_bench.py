"""Prefill of N fresh prompts at once, and the whole N-way run, per weight variant (issue 15).

    python benchmarks/prefill_bench.py [--variants bf16,w4g64] [--runs 5] [--threads 2] [--profile]

Per variant, in this process one after the other: the median wall time of `LLM.generate(prompts,
max_tokens=1)` on `--prompts` fresh prompts of `--prompt-len` tokens (the prefill step and one sampled
token; the prefix cache is reset before each run), and of the whole `--gen-len` run (engine_bench's
16-way workload), with the minor page faults of each. `--profile` adds a torch profile of one whole run per variant: the top ops by self
CPU time. Writes benchmarks/results/prefill_bench.json (or --out).
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path


def load(variant: str, cache: Path, kv_tokens: int):
    from slimlm.bench.variants import CHECKPOINTS, checkpoint
    from slimlm.engine.llm import LLM

    model = str(checkpoint(variant, cache)) if variant in CHECKPOINTS else None
    weights = "native" if variant == "native" else "float"
    return LLM(
        model, dtype="bfloat16", device="cpu", kv_cache_tokens=kv_tokens, progress=False, weights=weights
    )


FAULTS: list[int] = []  # minor page faults of each timed_generate call


def timed_generate(llm, prompts, n: int) -> float:
    from slimlm.engine.params import SamplingParams

    llm.engine.block_manager.reset_prefix_cache()  # real prefill, not a cache hit
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    FAULTS.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return elapsed


def profile_run(llm, prompts, n: int, top: int) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    llm.engine.block_manager.reset_prefix_cache()
    from slimlm.engine.params import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("whole_run"):
            llm.generate(prompts, params)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": e.self_cpu_time_total / 1000,
            "total_ms": e.cpu_time_total / 1000,
        }
        for e in rows[:top]
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="bf16,w4g64")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="also a torch profile of one whole run")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "slimlm" / "bench"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prefill_bench.json"))
    args = ap.parse_args()
    import torch

    from slimlm.bench.workload import make_prompts

    torch.set_num_threads(args.threads)
    kv_tokens = (args.prompts + 1) * (args.prompt_len + args.gen_len + 16)
    rows = {}
    for variant in args.variants.split(","):
        llm = load(variant, Path(args.cache), kv_tokens)
        prompts = make_prompts(llm.tokenizer, args.prompts, args.prompt_len)
        timed_generate(llm, prompts, 2)  # warm-up
        FAULTS.clear()
        prefill = [timed_generate(llm, prompts, 1) for _ in range(args.runs)]
        whole = [timed_generate(llm, prompts, args.gen_len) for _ in range(args.runs)]
        prefill_faults, whole_faults = FAULTS[: args.runs], FAULTS[args.runs :]
        row = {
            "prefill_ms": statistics.median(prefill) * 1000,
            "whole_run_ms": statistics.median(whole) * 1000,
            "throughput_tok_s": args.prompts * args.gen_len / statistics.median(whole),
            "prefill_minor_faults": statistics.median(prefill_faults),
            "runs": {
                "prefill_ms": [t * 1000 for t in prefill],
                "whole_run_ms": [t * 1000 for t in whole],
                "prefill_minor_faults": prefill_faults,
                "whole_run_minor_faults": whole_faults,
            },  # fmt: skip
        }
        if args.profile:
            row["profile"] = profile_run(llm, prompts, args.gen_len, args.top)
        rows[variant] = row
        print(f"{variant:8} prefill {row['prefill_ms']:7.0f} ms  whole run {row['whole_run_ms']:7.0f} ms  "
              f"{row['throughput_tok_s']:6.1f} tok/s, {row['prefill_minor_faults']:.0f} page faults a prefill", file=sys.stderr, flush=True)  # fmt: skip
        if args.profile:
            for r in row["profile"]:
                print(f"    {r['op'][:60]:60} {r['calls']:7d} {r['self_ms']:9.1f} ms", file=sys.stderr)
        del llm
    base = rows.get("bf16")
    if base:
        for row in rows.values():
            row["prefill_vs_bf16"] = row["prefill_ms"] / base["prefill_ms"]
            row["throughput_vs_bf16"] = row["throughput_tok_s"] / base["throughput_tok_s"]
    settings = {k: getattr(args, k) for k in ("runs", "threads", "prompts", "prompt_len", "gen_len")}
    Path(args.out).write_text(json.dumps({"settings": settings, "variants": rows}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
