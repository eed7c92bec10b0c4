"""Engine benchmark (issue 3): slimlm vs transformers vs llama-cpp-python on SmolLM2-135M, one run.

    python benchmarks/engine_bench.py [--dtype bfloat16] [--runs 3] [--model gemma3-270m]

Writes benchmarks/results/engine_bench_<dtype>.json (engine_bench_<model>_<dtype>.json with --model)
and prints the table with ratios.

    python benchmarks/engine_bench.py --variants bf16,native,w4g32,w4g64,w8,llama.cpp [--runs 3]

measures weight variants of the same model instead, each in its own process (slimlm/bench/variants.py:
peak RSS per variant), and writes benchmarks/results/engine_bench_quant.json. With --model DIR (an HF
directory, or the synthetic `smollm2-1.7b-shape`, slimlm/bench/models.py) bf16 runs DIR and the w*
variants run its `slimlm quantize` checkpoints (engine_bench_quant_<name>.json).

    python benchmarks/engine_bench.py --merge A.json,B.json --out C.json

joins the variant rows of several --variants runs (e.g. one variant per quiet hold) into one file and
recomputes the ratios.
"""

import argparse
import json
from pathlib import Path

from slimlm.bench.models import merge_variant_results, model_tag
from slimlm.bench.run import print_table, run_bench
from slimlm.bench.variants import VARIANTS, print_variants
from slimlm.bench.variants import run_variants as run_variants_in


def run_variants(args) -> None:
    """Each variant in its own process, all loaded, measured in interleaved rounds; ratios against bf16 and llama.cpp."""
    rows = run_variants_in(args.variants.split(","), args.threads, args.runs, args.gen_len, args.prompt_len,
                           args.cpu_time, model=args.model)  # fmt: skip
    print_variants(rows)
    name = f"engine_bench_quant_{model_tag(args.model)}.json" if args.model else "engine_bench_quant.json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    meta = {"model": args.model or "embedded SmolLM2-135M", "clock": "process CPU time" if args.cpu_time else "wall", "threads": args.threads, "runs": args.runs, "gen_len": args.gen_len, "prompt_len": args.prompt_len,
            "concurrency": 16, "note": "machine shared with other jobs; variants interleaved round by round, ratios = median of per-round ratios"}  # fmt: skip
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
    ap.add_argument(
        "--merge", default=None, help="comma-separated --variants results files to join (needs --out)"
    )
    args = ap.parse_args()
    if args.merge:
        if not args.out:
            raise SystemExit("--merge needs --out FILE")
        merged = merge_variant_results([Path(f) for f in args.merge.split(",")])
        print_variants(merged["variants"])
        Path(args.out).write_text(json.dumps(merged, indent=2))
        print(f"wrote {args.out}")
        raise SystemExit(0)
    if args.variants:
        from slimlm.errors import SlimlmError

        try:
            run_variants(args)
        except SlimlmError as e:
            raise SystemExit(f"error: {e}") from None
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
