"""`slimlm eval ppl` and `slimlm eval compare`: perplexity and KL divergence on text nobody here wrote,
variants side by side.

Default corpus: the eval half of pydoc_data.topics (disjoint from the calibration half; see
slimlm/quant/calibration.py); `--text gpl3` is a second one (slimlm/eval/texts.py). Default windows:
512 tokens, non-overlapping (stride = context); `--max-tokens` counts scored tokens.
"""

from __future__ import annotations

import argparse
import json
import sys

from slimlm.errors import SlimlmError
from slimlm.formats.dtypes import KV_DTYPES, kv_dtype_name


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="{ppl,compare}")
    ppl = sub.add_parser("ppl", help="perplexity of one model (and KL from saved reference logits)")
    ppl.add_argument("--model", "-m", default=None)
    ppl.add_argument(
        "--kv-dtype",
        default="auto",
        choices=KV_DTYPES,
        help="run each window through a paged KV pool of this format (auto: the model's dtype)",
    )
    ppl.add_argument(
        "--save-ref-logits", default=None, metavar="DIR", help="save this run's log-probs as the reference"
    )
    ppl.add_argument(
        "--ref-logits",
        default=None,
        metavar="DIR",
        help="reference saved by --save-ref-logits: also report KL divergence and top-1 agreement",
    )
    cmp = sub.add_parser("compare", help="perplexity, KL, size, speed and load time of several variants")
    cmp.add_argument(
        "--models",
        nargs="+",
        required=True,
        help="models to compare; the first is the reference (use 'default' for the embedded model)",
    )
    cmp.add_argument("--labels", nargs="*", default=None)
    cmp.add_argument(
        "--kv-dtypes",
        nargs="*",
        default=None,
        help=f"KV format of each variant, one per model ({', '.join(KV_DTYPES)}; default auto)",
    )
    cmp.add_argument(
        "--ref-logits",
        default=None,
        metavar="DIR",
        help="where to keep the first variant's log-probs (default: a temporary directory)",
    )
    cmp.add_argument("--no-speed", action="store_true", help="skip the decode-speed run")
    cmp.add_argument("--json", default=None, help="also write results to this file")
    for q in (ppl, cmp):
        src = q.add_mutually_exclusive_group()
        src.add_argument(
            "--corpus", default=None, help="text or JSONL file (default: pydoc_data.topics eval slice)"
        )
        src.add_argument("--text", default=None, choices=("pydoc", "gpl3"), help="a named evaluation text")
        q.add_argument("--context", type=int, default=512)
        q.add_argument("--stride", type=int, default=None, help="default: = context (no overlap)")
        q.add_argument(
            "--max-tokens", type=int, default=16384, help="score at most this many tokens (0 = all)"
        )
        q.add_argument("--dtype", default="float32")
        q.add_argument(
            "--calib-file",
            default=None,
            help="warn if this calibration text overlaps the evaluation text "
            "(default: the calibration a quantized model records)",
        )
        q.add_argument("--quiet", "-q", action="store_true")


def _eval_text(args) -> tuple[str, str]:
    from slimlm.eval.texts import named_text
    from slimlm.quant.calibration import load_text

    if args.corpus:
        return load_text(args.corpus, what="--corpus file"), args.corpus
    name = args.text or "pydoc"
    return named_text(name), {"pydoc": "pydoc_data.topics eval slice", "gpl3": "GPL-3"}[name]


def _check_calibration(args, text: str, text_name: str, quantization: dict | None) -> None:
    """Warns when the calibration text (given, or recorded by `slimlm quantize`) overlaps the eval text."""
    from pathlib import Path

    from slimlm.eval.overlap import warn_overlap
    from slimlm.quant.calibration import calibration_text, load_text

    source = args.calib_file or (quantization or {}).get("calibration")
    if not source:
        return
    if source == "default":
        warn_overlap(calibration_text(), text, "pydoc_data.topics calibration slice", text_name)
    elif Path(source).is_file():
        warn_overlap(load_text(source, what="--calib-file"), text, source, text_name)
    elif args.calib_file:
        load_text(source, what="--calib-file")  # raises the missing-file error


def _run_ppl(args, text: str, text_name: str, max_tokens: int | None) -> int:
    from slimlm.eval.compare import run_meta
    from slimlm.eval.fidelity import FidelityStats, log_probs
    from slimlm.eval.perplexity import scored_count, scored_windows
    from slimlm.eval.reference import ReferenceReader, ReferenceWriter
    from slimlm.loading import load

    if args.save_ref_logits and args.ref_logits:
        raise SlimlmError("give --save-ref-logits or --ref-logits, not both")
    reader = ReferenceReader(args.ref_logits) if args.ref_logits else None
    loaded = load(args.model, dtype=args.dtype, progress=not args.quiet)
    _check_calibration(args, text, text_name, loaded.config.quantization)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    meta = run_meta(loaded, ids, args.context, args.stride, max_tokens)
    if reader:
        reader.check(meta)
    writer = None
    if args.save_ref_logits:
        rows = scored_count(meta["num_ids"], args.context, args.stride)
        writer = ReferenceWriter(args.save_ref_logits, rows, loaded.config.vocab_size, meta)
    stats = FidelityStats()
    for logits, targets in scored_windows(
        loaded.model, ids, args.context, args.stride, max_tokens, not args.quiet, args.kv_dtype
    ):
        lp = log_probs(logits)
        ref = reader.next(len(targets)) if reader else lp
        if writer:
            writer.add(lp)
        stats.add_logprobs(ref, logits, targets)
    s = stats.summary()
    if writer:
        writer.meta["ppl"] = s["ppl"]  # exact; the float16 rows round it a little
        writer.close()
    if reader and "ppl" in reader.meta:
        s["ref_ppl"] = reader.meta["ppl"]
        s["delta_ppl_pct"] = 100 * (s["ppl"] / s["ref_ppl"] - 1)
    print(
        f"perplexity {s['ppl']:.4f} over {s['tokens']} tokens of {text_name} "
        f"(context {args.context}, stride {args.stride or args.context}, KV {args.kv_dtype})"
    )
    if reader:
        print(
            f"vs reference: perplexity {s['ref_ppl']:.4f} ({s['delta_ppl_pct']:+.2f}%), "
            f"KL mean {s['kl_mean']:.5f} p99 {s['kl_p99']:.5f} nats, top-1 agreement {100 * s['top1_agree']:.2f}%"
        )
    if writer:
        print(f"saved reference log-probs to {args.save_ref_logits}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.eval_command is None:
        raise SlimlmError("say what to evaluate: slimlm eval ppl ... or slimlm eval compare --models A B ...")
    if args.max_tokens < 0:
        raise SlimlmError("--max-tokens must be >= 0")
    text, text_name = _eval_text(args)
    max_tokens = args.max_tokens or None
    if args.eval_command == "ppl":
        return _run_ppl(args, text, text_name, max_tokens)
    from slimlm.eval.compare import as_dicts, compare_variants, print_results
    from slimlm.loading import load_config

    models = [None if m == "default" else m for m in args.models]
    labels = args.labels or [m or "default" for m in args.models]
    if len(labels) != len(models):
        raise SlimlmError(f"got {len(models)} models but {len(labels)} labels")
    kv_dtypes = args.kv_dtypes or ["auto"] * len(models)
    if len(kv_dtypes) != len(models):
        raise SlimlmError(f"got {len(models)} models but {len(kv_dtypes)} --kv-dtypes")
    kv_dtypes = [kv_dtype_name(kv) for kv in kv_dtypes]  # the one check of a KV dtype
    for m in models:
        _check_calibration(args, text, text_name, load_config(m).quantization)
    results = compare_variants(
        models,
        labels,
        args.dtype,
        lambda tok: tok.encode(text, add_special_tokens=False),
        args.context,
        max_tokens,
        not args.quiet,
        stride=args.stride,
        kv_dtypes=kv_dtypes,
        ref_logits=args.ref_logits,
        speed=not args.no_speed,
    )
    print_results(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(as_dicts(results), f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
