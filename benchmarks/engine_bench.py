"""Engine benchmark (issue 3): slimlm vs transformers vs llama-cpp-python on SmolLM2-135M, one run.

    python benchmarks/engine_bench.py [--dtype bfloat16] [--runs 3] [--model gemma3-270m]

Writes benchmarks/results/engine_bench_<dtype>.json (engine_bench_<model>_<dtype>.json with --model)
and prints the table with ratios.

    python benchmarks/engine_bench.py --variants bf16,native,w4g32,w4g64,w8,llama.cpp [--runs 3]

measures weight variants of the same model instead, each in its own process (slimlm/bench/variants.py:
peak RSS per variant), and writes benchmarks/results/engine_bench_quant.json.
"""

import argparse
import json
from pathlib import Path

from slimlm.bench.run import print_table, run_bench
from slimlm.bench.variants import VARIANTS


def run_variants(args) -> None:
    """Each variant in a fresh process, one after the other; ratios against bf16 and llama.cpp."""
    import subprocess
    import sys

    rows = {}
    for variant in args.variants.split(","):
        done = subprocess.run(
            [sys.executable, "-m", "slimlm.bench.variants", variant, "--threads", str(args.threads),
             "--runs", str(args.runs), "--gen-len", str(args.gen_len), "--prompt-len", str(args.prompt_len), *(["--cpu-time"] if args.cpu_time else [])],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            rows[variant] = {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(variant, json.dumps({k: v for k, v in rows[variant].items() if k != "runs"}), flush=True)
    base, peer = rows.get("bf16", {}), rows.get("llama.cpp", {})
    for r in rows.values():
        for key in ("decode_tok_s", "throughput_tok_s", "ttft_s", "peak_rss_bytes"):
            if key in r and key in base:
                r[f"{key}_vs_bf16"] = r[key] / base[key]
            if key in r and key in peer:
                r[f"{key}_vs_llama_cpp"] = r[key] / peer[key]
    print(
        f"{'variant':10} {'TTFT ms':>8} {'decode':>8} {'16-way':>8} {'RSS MiB':>8}  decode/bf16 decode/llama 16-way/bf16 RSS/bf16"
    )
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:10} error: {r['error']}")
            continue
        print(f"{name:10} {r['ttft_s'] * 1000:8.0f} {r['decode_tok_s']:8.1f} {r['throughput_tok_s']:8.1f} "
              f"{r['peak_rss_bytes'] / 2**20:8.0f}  {r.get('decode_tok_s_vs_bf16', 0):11.2f} "
              f"{r.get('decode_tok_s_vs_llama_cpp', 0):12.2f} {r.get('throughput_tok_s_vs_bf16', 0):11.2f} "
              f"{r.get('peak_rss_bytes_vs_bf16', 0):8.2f}")  # fmt: skip
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "engine_bench_quant.json"
    meta = {"clock": "process CPU time" if args.cpu_time else "wall", "threads": args.threads, "runs": args.runs, "gen_len": args.gen_len, "prompt_len": args.prompt_len,
            "concurrency": 16, "note": "machine shared with other jobs; ratios within this run"}  # fmt: skip
    out.write_text(json.dumps({"settings": meta, "variants": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", default=None, help="alias, .gguf or HF dir (default: the embedded SmolLM2)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="slimlm,transformers,llama.cpp")
    ap.add_argument("--weights-layout", default="auto", help="auto | packed | plain | both")
    ap.add_argument("--decode-kernel", default="auto", help="auto | c | torch (slimlm's decode steps)")
    ap.add_argument("--weights", default="float", help="float | native (a GGUF's own blocks on the C kernel)")
    ap.add_argument("--out", default=None, help="results file (default results/engine_bench_<dtype>.json)")
    ap.add_argument("--variants", default=None, help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--gen-len", type=int, default=64, help="--variants: tokens per request")
    ap.add_argument("--prompt-len", type=int, default=128, help="--variants: prompt tokens")
    ap.add_argument("--cpu-time", action="store_true", help="--variants: process CPU time, not wall time")
    args = ap.parse_args()
    if args.variants:
        run_variants(args)
        raise SystemExit(0)
    results = run_bench(
        args.model, args.dtype, tuple(args.peers.split(",")), args.runs, threads=args.threads,
        weights_layout=args.weights_layout, decode_kernel=args.decode_kernel, weights=args.weights,
    )  # fmt: skip
    print_table(results)
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent
        / "results"
        / f"engine_bench_{args.model + '_' if args.model else ''}{args.dtype}"
        f"{'_native' if args.weights == 'native' else ''}.json"
    )
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
