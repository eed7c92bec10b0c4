"""Engine benchmark (issue 3): slimlm vs transformers vs llama-cpp-python on SmolLM2-135M, one run.

    python benchmarks/engine_bench.py [--dtype bfloat16] [--runs 3] [--model gemma3-270m]

Writes benchmarks/results/engine_bench_<dtype>.json (engine_bench_<model>_<dtype>.json with --model)
and prints the table with ratios.
"""

import argparse
import json
from pathlib import Path

from slimlm.bench.run import print_table, run_bench

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", default=None, help="alias, .gguf or HF dir (default: the embedded SmolLM2)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="slimlm,transformers,llama.cpp")
    ap.add_argument("--weights-layout", default="auto", help="auto | packed | plain | both")
    ap.add_argument("--decode-kernel", default="auto", help="auto | c | torch (slimlm's decode steps)")
    ap.add_argument("--out", default=None, help="results file (default results/engine_bench_<dtype>.json)")
    args = ap.parse_args()
    results = run_bench(
        args.model, args.dtype, tuple(args.peers.split(",")), args.runs, threads=args.threads,
        weights_layout=args.weights_layout, decode_kernel=args.decode_kernel,
    )  # fmt: skip
    print_table(results)
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent
        / "results"
        / f"engine_bench_{args.model + '_' if args.model else ''}{args.dtype}.json"
    )
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
