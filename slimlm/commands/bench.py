"""`slimlm bench`: slimlm vs transformers vs llama.cpp on the same model, dtype and threads, in one run."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="model (default: the embedded smollm2-135m GGUF)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto")
    p.add_argument("--peers", default="slimlm,transformers,llama.cpp", help="comma-separated systems to run")
    p.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--weights-layout",
        default="auto",
        help="slimlm's linear layout: auto (as chat and serve pick: plain where the C decode kernel "
        "runs, else plain for batch-1 and packed for concurrent) | packed | plain | both",
    )
    p.add_argument(
        "--decode-kernel",
        default="auto",
        help="slimlm's decode steps: auto | c | torch (see slimlm generate -h)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="instead of peers, weight variants of the embedded model, each in its own process: comma-separated "
        "of bf16, native, w4g32, w4g64, w4g128, w8, llama.cpp (docs/engine.md)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from slimlm.bench.run import print_table, run_bench
    from slimlm.errors import SlimlmError

    for name in ("runs", "concurrency", "prompt_len", "gen_len"):
        if getattr(args, name) <= 0:
            raise SlimlmError(f"--{name.replace('_', '-')} must be positive")
    if args.json:  # written after minutes of measuring: refuse a path that would replace the model
        from slimlm.loading.default_model import resolve_model_path
        from slimlm.output_dir import check_not_overlapping

        check_not_overlapping(args.json, resolve_model_path(args.model), "--json", "the model")
    if args.variants:
        from slimlm.bench.variants import print_variants, run_variants

        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        rows = run_variants(
            names, args.threads or 2, args.runs, args.gen_len, args.prompt_len, model=args.model
        )
        print_variants(rows)
        results = {"variants": rows}
        if args.json:
            _write_json(args.json, results)
        return 0
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    results = run_bench(
        args.model,
        args.dtype,
        peers,
        args.runs,
        args.concurrency,
        args.prompt_len,
        args.gen_len,
        args.threads,
        weights_layout=args.weights_layout,
        decode_kernel=args.decode_kernel,
    )
    print_table(results)
    if args.json:
        _write_json(args.json, results)
    return 0


def _write_json(path: str, results: dict) -> None:
    from slimlm.errors import SlimlmError

    try:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
    except OSError as e:
        raise SlimlmError(f"cannot write --json {path}: {e.strerror or e}") from None
