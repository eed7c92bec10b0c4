"""`slimlm eval ppl` and `slimlm eval compare`: perplexity on text nobody here wrote, variants side by side.

Default corpus: the eval half of pydoc_data.topics (disjoint from the calibration half; see
slimlm/quant/calibration.py). Default windows: 512 tokens, non-overlapping (stride = context).
"""

from __future__ import annotations

import argparse
import json
import sys

from slimlm.errors import SlimlmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="{ppl,compare}")
    ppl = sub.add_parser("ppl", help="perplexity of one model")
    ppl.add_argument("--model", "-m", default=None)
    cmp = sub.add_parser("compare", help="perplexity, size, speed and load time of several variants")
    cmp.add_argument(
        "--models",
        nargs="+",
        required=True,
        help="models to compare; the first is the baseline (use 'default' for the embedded model)",
    )
    cmp.add_argument("--labels", nargs="*", default=None)
    cmp.add_argument("--json", default=None, help="also write results to this file")
    for q in (ppl, cmp):
        q.add_argument(
            "--corpus", default=None, help="text or JSONL file (default: pydoc_data.topics eval slice)"
        )
        q.add_argument("--context", type=int, default=512)
        q.add_argument("--stride", type=int, default=None, help="default: = context (no overlap)")
        q.add_argument(
            "--max-tokens", type=int, default=16384, help="score at most this many tokens (0 = all)"
        )
        q.add_argument("--dtype", default="float32")
        q.add_argument("--quiet", "-q", action="store_true")


def _token_ids_fn(corpus: str | None):
    from slimlm.quant.calibration import eval_text, load_text

    text = load_text(corpus) if corpus else eval_text()
    return lambda tok: tok.encode(text, add_special_tokens=False)


def run(args: argparse.Namespace) -> int:
    from slimlm.eval.perplexity import perplexity
    from slimlm.loading import load

    if args.eval_command is None:
        raise SlimlmError("say what to evaluate: slimlm eval ppl ... or slimlm eval compare --models A B ...")
    if args.max_tokens < 0:
        raise SlimlmError("--max-tokens must be >= 0")
    token_ids = _token_ids_fn(args.corpus)
    max_tokens = args.max_tokens or None
    if args.eval_command == "ppl":
        loaded = load(args.model, dtype=args.dtype, progress=not args.quiet)
        r = perplexity(
            loaded.model, token_ids(loaded.tokenizer), args.context, args.stride, max_tokens, not args.quiet
        )
        print(f"perplexity {r.ppl:.4f} over {r.tokens} tokens (context {r.context}, stride {r.stride})")
        return 0
    from slimlm.eval.compare import as_dicts, compare_variants, print_results

    models = [None if m == "default" else m for m in args.models]
    labels = args.labels or [m or "default" for m in args.models]
    if len(labels) != len(models):
        raise SlimlmError(f"got {len(models)} models but {len(labels)} labels")
    results = compare_variants(
        models, labels, args.dtype, token_ids, args.context, max_tokens, not args.quiet
    )
    print_results(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(as_dicts(results), f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
