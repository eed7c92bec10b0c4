"""`slimlm quantize`: RTN / AWQ / GPTQ weight-only quantization to a checkpoint any command can load."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from slimlm.commands.common import read_text_file
from slimlm.errors import SlimlmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="source model (default: the embedded smollm2-135m)")
    p.add_argument(
        "--method",
        choices=("rtn", "awq", "gptq", "awq-gptq"),
        default="awq",
        help="awq-gptq: AWQ's scales folded in, then GPTQ",
    )
    p.add_argument("--bits", type=int, default=4, help="8 or 4")
    p.add_argument(
        "--group-size",
        type=_group_size,
        default=None,
        help="128, 64, 32 or -1 (one scale per output channel); default: the largest of 128/64/32 that "
        "divides every input width of the model",
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        default=64,
        help="calibration windows (awq, gptq, --scale-search imatrix)",
    )
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
        "float; auto: quantize (at --bits 8 in int8 groups of 32, llama.cpp's Q8_0 grid)",
    )
    p.add_argument(
        "--keep-embeddings-float",
        dest="embeddings",
        action="store_const",
        const="float",
        help="alias of --embeddings float",
    )
    p.add_argument(
        "--embedding-bits",
        type=int,
        choices=(4, 8),
        default=None,
        help="bits of the quantized embedding/lm_head table (default: --bits); 8 beside 4-bit weights is "
        "the recommended w4 recipe (docs/quantization.md)",
    )
    p.add_argument(
        "--embedding-group-size",
        type=int,
        choices=(32, 64, 128, -1),
        default=None,
        help="group size of the quantized embedding/lm_head table (-1: per channel); default: --group-size "
        "for a 4-bit table, 32 for an 8-bit one at --bits 8 (Q8_0's blocks), per channel for an 8-bit "
        "table beside 4-bit weights",
    )
    p.add_argument(
        "--zero",
        choices=("int", "float"),
        default="int",
        help="4-bit zero points: int (w = s*(q - z), z an integer) or float (w = s*q + min per group, "
        "as GGUF Q4_1 stores it)",
    )
    p.add_argument(
        "--group-sizes",
        type=_group_sizes,
        default=None,
        metavar="NAME=G,...",
        help="per-linear group sizes, e.g. self_attn.v_proj=32,mlp.down_proj=32 (every layer) or "
        "3.mlp.down_proj=32 (layer 3 only); the rest use --group-size",
    )
    p.add_argument(
        "--rotate",
        choices=("none", "hadamard", "orthogonal"),
        default="none",
        help="fold the norms and rotate the residual stream and value heads before quantizing "
        "(QuaRot-style, weight-only; a tied embedding is untied: one more table). Llama family only",
    )
    p.add_argument(
        "--scale-search",
        choices=("minmax", "mse", "imatrix"),
        default="minmax",
        help="each 4/8-bit group's grid (rtn, gptq, awq-gptq): minmax (its min and max), mse (least squared "
        "rounding error) or imatrix (error weighted by E[x^2] of each input column on the calibration text, "
        "as llama.cpp's importance matrix; with rtn it calibrates too)",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--quiet", "-q", action="store_true")


def _group_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a group size; use 128, 64, 32, -1 or auto"
        ) from None


def _group_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"{item!r} is not NAME=GROUP; write e.g. self_attn.v_proj=32,mlp.down_proj=32"
            ) from None
    return sizes


def _stored_dtypes(model: str | None) -> set[str]:
    """The safetensors dtypes of an HF directory's floating tensors (empty for a GGUF or anything else)."""
    from slimlm.loading.default_model import resolve_model_path
    from slimlm.loading.safetensors_dir import is_hf_dir, safetensors_files, stored_float_dtypes

    path = resolve_model_path(model)
    return stored_float_dtypes(safetensors_files(path)) if is_hf_dir(path) else set()


def run(args: argparse.Namespace) -> int:
    from slimlm.loading import load
    from slimlm.loading.default_model import resolve_model_path
    from slimlm.output_dir import check_not_overlapping, staged_output
    from slimlm.quant.calibration import calibration_batches, load_text
    from slimlm.quant.format import save_quantized
    from slimlm.quant.quantize import group_sizes_that_fit, quantize_model, quantized_weight_bytes
    from slimlm.quant.scheme import check_scheme
    from slimlm.tokenizer.save import save_tokenizer

    check_scheme(args.bits, 128 if args.group_size is None else args.group_size)
    if args.method == "awq" and args.scale_search != "minmax":
        raise SlimlmError(f"--scale-search {args.scale_search} applies to --method rtn, gptq and awq-gptq; "
                          "awq picks its grids by its own clipping search (use --method awq-gptq)")  # fmt: skip
    calibrated = args.method != "rtn" or args.scale_search == "imatrix"
    out = Path(args.out).expanduser().resolve()
    check_not_overlapping(out, resolve_model_path(args.model), "--out", "the source model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimlmError(f"--out {out} already exists and is not empty; choose a new directory")
    if args.calib_file:
        read_text_file(args.calib_file, "--calib-file")  # a binary file: one line, not a traceback
    text = load_text(args.calib_file) if args.calib_file else None
    if text is not None and calibrated:
        from slimlm.eval.overlap import warn_overlap
        from slimlm.quant.calibration import eval_text

        warn_overlap(text, eval_text(), args.calib_file, "slimlm eval's default pydoc_data.topics slice")
    progress = not args.quiet
    # plain RTN reads each weight once, upcast per tensor (rtn.py): a bf16 source loads as bf16, half
    # the memory of a float32 load (1.7B: 9.1 -> ~5 GB peak) for bit-identical codes and scales
    plain_rtn = args.method == "rtn" and args.scale_search == "minmax" and args.rotate in (None, "none")
    load_dtype = "bfloat16" if plain_rtn and _stored_dtypes(args.model) == {"BF16"} else "float32"
    loaded = load(args.model, dtype=load_dtype, progress=progress)
    if loaded.config.quantization:
        raise SlimlmError("the source model is already quantized; quantize the original float checkpoint")
    group_size, group_note = args.group_size, ""
    if group_size is None:
        fits = group_sizes_that_fit(loaded.model)
        if not fits:
            raise SlimlmError("no group size of 128/64/32 divides every input width of this model; "
                              "pass --group-size -1 (one scale per output channel)")  # fmt: skip
        group_size = fits[0]
        group_note = f" (group size {group_size}: the largest of 128/64/32 dividing every input width)"
    batches = None
    if calibrated:
        encode = lambda t: loaded.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        batches = calibration_batches(encode, text, args.calib_samples, args.calib_seqlen)
    float_bytes = quantized_weight_bytes(loaded.model)
    start = time.perf_counter()
    qconfig = quantize_model(
        loaded.model,
        args.method,
        args.bits,
        group_size,
        batches,
        progress,
        act_order=args.act_order,
        quantize_embeddings=args.embeddings,
        float_zero=args.zero == "float",
        embedding_bits=args.embedding_bits,
        embedding_group_size=args.embedding_group_size,
        group_sizes=args.group_sizes,
        rotate=args.rotate,
        scale_search=args.scale_search,
    )
    seconds = time.perf_counter() - start
    if batches is not None:  # `slimlm eval` warns when this text overlaps what it scores
        qconfig["calibration"] = str(Path(args.calib_file).resolve()) if args.calib_file else "default"
    with staged_output(out) as tmp:  # an interrupted quantize leaves no half-written checkpoint
        # a rotation may have untied the embedding: the model's own config says so
        save_quantized(loaded.model, qconfig, tmp, loaded.model.config.to_hf_dict())
        save_tokenizer(loaded.tokenizer, tmp)
    q_bytes = quantized_weight_bytes(loaded.model)
    print(
        f"{args.method}{'' if args.scale_search == 'minmax' else ' + ' + args.scale_search} w{args.bits} g{group_size}: {float_bytes / 2**20:.1f} MiB {'bf16' if load_dtype == 'bfloat16' else 'fp32'} -> {q_bytes / 2**20:.1f} MiB "
        f"in {seconds:.1f}s; wrote {out}{group_note}",
        file=sys.stderr,
    )
    return 0
