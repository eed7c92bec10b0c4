"""`slimlm quantize`: RTN / AWQ / GPTQ weight-only quantization to a checkpoint any command can load."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from slimlm.errors import SlimlmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="source model (default: the embedded smollm2-135m)")
    p.add_argument("--method", choices=("rtn", "awq", "gptq"), default="awq")
    p.add_argument("--bits", type=int, default=4, help="8 or 4")
    p.add_argument("--group-size", type=int, default=128, help="32, 64 or 128")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows (awq, gptq)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument(
        "--calib-file",
        default=None,
        help="calibration text or JSONL ({'text': ...} per line); "
        "default: a slice of pydoc_data.topics disjoint from the eval slice",
    )
    p.add_argument(
        "--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal"
    )
    p.add_argument(
        "--embeddings",
        choices=("auto", "quantize", "float"),
        default="auto",
        help="token embedding and lm_head: quantize them (the head with --method) or keep them "
        "float; auto: quantize at 4 bits, float at 8",
    )
    p.add_argument(
        "--keep-embeddings-float",
        dest="embeddings",
        action="store_const",
        const="float",
        help="alias of --embeddings float",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--quiet", "-q", action="store_true")


def run(args: argparse.Namespace) -> int:
    from slimlm.loading import load
    from slimlm.loading.default_model import resolve_model_path
    from slimlm.quant.calibration import calibration_batches, load_text
    from slimlm.quant.format import save_quantized
    from slimlm.quant.quantize import quantize_model, quantized_weight_bytes
    from slimlm.quant.scheme import check_scheme
    from slimlm.tokenizer.save import save_tokenizer

    check_scheme(args.bits, args.group_size)
    source = resolve_model_path(args.model).resolve()
    out = Path(args.out).expanduser().resolve()
    if out == source or out in source.parents or (source.is_dir() and source in out.parents):
        raise SlimlmError(f"--out {out} overlaps the source model {source}; choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimlmError(f"--out {out} already exists and is not empty; choose a new directory")
    text = load_text(args.calib_file) if args.calib_file else None
    if text is not None and args.method != "rtn":
        from slimlm.eval.overlap import warn_overlap
        from slimlm.quant.calibration import eval_text

        warn_overlap(text, eval_text(), args.calib_file, "slimlm eval's default pydoc_data.topics slice")
    progress = not args.quiet
    loaded = load(args.model, dtype="float32", progress=progress)
    if loaded.config.quantization:
        raise SlimlmError("the source model is already quantized; quantize the original float checkpoint")
    batches = None
    if args.method != "rtn":
        encode = lambda t: loaded.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        batches = calibration_batches(encode, text, args.calib_samples, args.calib_seqlen)
    float_bytes = quantized_weight_bytes(loaded.model)
    start = time.perf_counter()
    qconfig = quantize_model(
        loaded.model,
        args.method,
        args.bits,
        args.group_size,
        batches,
        progress,
        act_order=args.act_order,
        quantize_embeddings=args.embeddings,
    )
    seconds = time.perf_counter() - start
    if batches is not None:  # `slimlm eval` warns when this text overlaps what it scores
        qconfig["calibration"] = str(Path(args.calib_file).resolve()) if args.calib_file else "default"
    save_quantized(loaded.model, qconfig, out, loaded.config.to_hf_dict())
    save_tokenizer(loaded.tokenizer, out)
    q_bytes = quantized_weight_bytes(loaded.model)
    print(
        f"{args.method} w{args.bits} g{args.group_size}: {float_bytes / 2**20:.1f} MiB fp32 -> {q_bytes / 2**20:.1f} MiB "
        f"in {seconds:.1f}s; wrote {out}",
        file=sys.stderr,
    )
    return 0
