"""Build the synthetic checkpoint with SmolLM2-1.7B's shapes (random bf16 weights, fixed seed).

    python benchmarks/synthetic_model.py [--name smollm2-1.7b-shape] [--out DIR] [--seed 0]

Default output: ~/.cache/slimlm/synthetic/<name> (outside the repository: 3.4 GB). Use it as any HF
directory (`--model DIR`), or as `--model smollm2-1.7b-shape` in benchmarks/engine_bench.py --variants,
which builds it on first use. Random weights: valid for memory and speed, never for fidelity
(see slimlm/bench/models.py).
"""

import argparse
import time
from pathlib import Path

from slimlm.bench.models import SYNTHETIC, build_synthetic, synthetic_cache

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="smollm2-1.7b-shape", choices=sorted(SYNTHETIC))
    ap.add_argument("--out", default=None, help="output directory (default ~/.cache/slimlm/synthetic/NAME)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out) if args.out else synthetic_cache() / args.name
    start = time.perf_counter()
    build_synthetic(out, SYNTHETIC[args.name], seed=args.seed)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
