"""`slimlm merge ADAPTER_DIR --output DIR`: fold a LoRA adapter into its base, write a full HF checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="a LoRA adapter directory in PEFT's format (what slimlm train writes)")
    p.add_argument(
        "--output", "-o", required=True, help="directory for config.json + model.safetensors + tokenizer"
    )
    p.add_argument(
        "--model", "-m", default=None, help="the base model (default: the one named in the adapter)"
    )
    p.add_argument(
        "--dtype", default="float32", help="float32 (default) | bfloat16 | float16 for the merged weights"
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.add_argument("--quiet", "-q", action="store_true")


def run(args: argparse.Namespace) -> int:
    from slimlm.train.merge import merge_adapter

    out = merge_adapter(args.adapter, args.output, model=args.model, dtype=args.dtype, overwrite=args.overwrite,
                        progress=not args.quiet)  # fmt: skip
    if not args.quiet:
        print(f"merged model written to {out}; run it with: slimlm chat --model {out}")
    return 0
