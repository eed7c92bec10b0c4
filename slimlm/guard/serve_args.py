"""`slimlm serve`'s guard options (kept free of server imports: argument parsing stays light)."""

from __future__ import annotations

import argparse

from slimlm.errors import SlimlmError

DEFAULT_THRESHOLD = 0.6


def add_guard_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guard (approved replies; needs slimlm[guard])")
    g.add_argument(
        "--guard", default=None, metavar="LIB", help="snap every answer to this library (slimlm guard build)"
    )
    g.add_argument(
        "--guard-threshold",
        type=float,
        default=None,
        metavar="T",
        help=f"cosine similarity needed to send an approved reply (default {DEFAULT_THRESHOLD}; slimlm guard calibrate)",
    )
    g.add_argument(
        "--guard-fallbacks", default=None, metavar="FILE", help='JSON {"default": [...], "STAGE": [...]}'
    )
    g.add_argument(
        "--guard-mode",
        default=None,
        choices=("snap", "deny"),
        help="snap: send the closest approved reply (default); deny: LIB holds forbidden examples, block answers close to one",
    )
    g.add_argument(
        "--guard-cache",
        type=int,
        default=None,
        metavar="N",
        help="remember the vectors of the last N answers (default 4096; 0: off): a repeated answer pays the search only",
    )
    g.add_argument(
        "--embedding-model",
        default=None,
        metavar="DIR",
        help="sentence-transformers directory (default all-MiniLM-L6-v2)",
    )
    g.add_argument(
        "--embeddings", action="store_true", help="serve POST /v1/embeddings (on with --guard too)"
    )


def guard_from_args(args: argparse.Namespace):
    """(guard or None, embedder or None), loaded before the LLM so mistakes fail fast."""
    if args.guard is None:
        given = [
            f
            for f in ("guard_threshold", "guard_fallbacks", "guard_mode", "guard_cache")
            if getattr(args, f, None) is not None
        ]
        if given:
            raise SlimlmError(f"--{given[0].replace('_', '-')} needs --guard LIB")
        if not (args.embeddings or args.embedding_model):
            return None, None
        from slimlm.guard.embedder import Embedder

        return None, Embedder(args.embedding_model)
    from slimlm.guard.policy import DEFAULT_VECTOR_CACHE, load_guard

    threshold = DEFAULT_THRESHOLD if args.guard_threshold is None else args.guard_threshold
    cache = DEFAULT_VECTOR_CACHE if getattr(args, "guard_cache", None) is None else args.guard_cache
    guard = load_guard(
        args.guard, threshold, args.guard_fallbacks, args.guard_mode or "snap", args.embedding_model,
        vector_cache=cache,
    )  # fmt: skip
    return guard, guard.embedder
