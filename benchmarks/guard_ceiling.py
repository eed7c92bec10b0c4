"""How fast can an exact (float32) answer embedding be on this CPU? The guard's latency floor.

For answers of 1, 3, 7 and 14 support sentences (the same answers as guard_bench.py), this counts the
embedding model's floating-point work (every linear layer plus attention's two products, from the
model's own config and the answer's token count) and measures this machine's float32 matrix-multiply
rate at exactly those shapes (torch, the given threads, best of many calls: each GEMM alone, warm in
cache, no other work). Their sum is a lower bound on any exact float32 embedding of that answer here:
norms, softmax, GELU, tokenization and the search still come on top. Beside it: the served query path
(`Embedder.encode_query`, ONNX Runtime fp32) on the same answers, and the bound if the GEMMs ran in
bf16 instead (not exact: shown for scale).

    /work/wt/bin/quiet python benchmarks/guard_ceiling.py   # -> benchmarks/results/guard_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from guard_bench import ANSWER_SENTENCES, answers_of_length  # noqa: E402


def gemm_seconds(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """Best time of one [m, k] @ [k, n] product (warm)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def model_gemms(config, tokens: int) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count) of every matrix product of one forward over `tokens` tokens."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    d = h // heads
    per_layer = [(tokens, h, h, 4), (tokens, h, inter, 1), (tokens, inter, h, 1),  # q, k, v, o; FFN up, down
                 (tokens, d, tokens, heads), (tokens, tokens, d, heads)]  # QK^T and PV per head  # fmt: skip
    return [(m, k, n, c * layers) for m, k, n, c in per_layer]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "guard_ceiling.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from slimlm.guard.embedder import Embedder

    embedder = Embedder()
    embedder.prepare_query()
    config = embedder.model[0].auto_model.config
    out = {
        "threads": args.threads,
        "model": embedder.path.name,
        "query_path": embedder.query_path,
        "lengths": {},
    }
    print(f"{'answer':>12} {'tokens':>6} {'GFLOP':>6} {'fp32 floor ms':>13} {'GFLOP/s':>8} {'served ms':>9} "
          f"{'served GFLOP/s':>14} {'bf16 floor ms':>13}")  # fmt: skip
    for sentences in ANSWER_SENTENCES:
        answers = answers_of_length(sentences, 20, seed=7)
        tokens = round(statistics.median(embedder.count_tokens([a]) for a in answers))
        gemms = model_gemms(config, tokens)
        flops = sum(2 * m * k * n * c for m, k, n, c in gemms)
        floor = {dt: sum(c * gemm_seconds(m, k, n, dt, args.repeats) for m, k, n, c in gemms)
                 for dt in (torch.float32, torch.bfloat16)}  # fmt: skip
        served = []
        for answer in answers * 2:
            start = time.perf_counter()
            embedder.encode_query([answer])
            served.append(time.perf_counter() - start)
        served_s = statistics.median(served[len(answers) :])  # the first pass warms up
        row = {"tokens_median": tokens, "gflop": flops / 1e9, "fp32_gemm_floor_ms": floor[torch.float32] * 1e3,
               "fp32_gemm_gflop_s": flops / floor[torch.float32] / 1e9, "served_median_ms": served_s * 1e3,
               "served_gflop_s": flops / served_s / 1e9, "bf16_gemm_floor_ms": floor[torch.bfloat16] * 1e3}  # fmt: skip
        out["lengths"][f"{sentences} sentences"] = row
        print(f"{sentences:>2} sentences {tokens:6d} {row['gflop']:6.2f} {row['fp32_gemm_floor_ms']:13.1f} "
              f"{row['fp32_gemm_gflop_s']:8.0f} {row['served_median_ms']:9.1f} {row['served_gflop_s']:14.0f} "
              f"{row['bf16_gemm_floor_ms']:13.1f}")  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
