"""`slimlm serve --replicas N --guard LIB` (and `--embeddings`): the guard runs in the ingress.

Where it loads, and why: once, in the ingress replica (the `Frontend` actor), not in each engine
replica. The guard decides on the whole answer, which only the ingress holds (a replica streams
tokens to it), so in the ingress it is the same middleware as in a single `slimlm serve`
(`slimlm.server.guard_route`) over the same app, and snapping is the same code on the same text.
It costs one copy of the embedding model and the library instead of N (all-MiniLM-L6-v2 is ~90 MB
of weights plus its ONNX Runtime copy; a 100k-reply library is ~350 MB with its HNSW index), and
/metrics counts every decision in one place with no aggregation across processes needed.

The ingress cannot receive the loaded guard (a faiss index and an ONNX session do not pickle), so it
gets the plain `GuardSpec` and loads from the same files; `slimlm serve` has already loaded it once
in the driver to fail fast on a bad library or fallbacks file, before Ray starts.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

FIELDS = ("guard", "guard_threshold", "guard_fallbacks", "guard_mode", "embedding_model", "embeddings")


@dataclass(frozen=True)
class GuardSpec:
    """The serve command's guard options with paths made absolute (picklable, for the ingress actor)."""

    guard: str | None
    guard_threshold: float | None
    guard_fallbacks: str | None
    guard_mode: str | None
    embedding_model: str | None
    embeddings: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GuardSpec | None:
        values = {f: getattr(args, f, None) for f in FIELDS}
        values["embeddings"] = bool(values["embeddings"])
        if values["guard"] is None and not values["embeddings"] and values["embedding_model"] is None:
            return None
        for f in ("guard", "guard_fallbacks", "embedding_model"):
            if values[f] is not None:
                values[f] = str(Path(values[f]).expanduser().resolve())
        return cls(**values)

    def load(self):
        """(guard or None, embedder or None), exactly as `slimlm serve` loads them."""
        from slimlm.guard.serve_args import guard_from_args

        return guard_from_args(argparse.Namespace(**asdict(self)))
