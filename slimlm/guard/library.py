"""A built library on disk: the replies, their unit embeddings and a faiss index over them.

LIB/ holds library.json (format, model, dimension, index kind, counts), replies.jsonl, vectors.npy
(one unit row per embedded text: each reply's text and its examples), owners.npy (row -> reply),
hashes.npy (sha1 of each row's text) and index.faiss. Rebuilding over an existing LIB embeds only
texts whose hash it has not seen with the same model; the rest are reused. When the new rows only
append to the old ones the old index is extended; any other edit rebuilds the index from the vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.guard import index as vindex
from slimlm.guard.replies import Reply, parse_reply, read_replies, rows_of

FORMAT = 1
META = "library.json"


@dataclass
class Hit:
    reply: Reply
    score: float
    row: int


@dataclass
class BuildReport:
    replies: int
    rows: int
    embedded: int
    reused: int
    index: str
    embed_s: float
    index_s: float
    index_extended: bool = False  # the old index was reused and only new rows added


def _sha1(texts: list[str]) -> np.ndarray:
    return np.array([hashlib.sha1(t.encode("utf-8")).digest() for t in texts], dtype="S20")


@dataclass
class _Previous:
    """What an existing library at --out offers for reuse (empty when built with another model)."""

    vectors: dict[bytes, np.ndarray]
    hashes: np.ndarray | None = None
    kind: str | None = None


def _previous(out: Path, model_id: str, dim: int) -> _Previous:
    try:
        meta = json.loads((out / META).read_text(encoding="utf-8"))
        if meta.get("model") != model_id or meta.get("dim") != dim:
            return _Previous({})
        hashes = np.load(out / "hashes.npy")
        vectors = np.load(out / "vectors.npy", mmap_mode="r")
    except (OSError, ValueError):
        return _Previous({})
    if len(hashes) != len(vectors):
        return _Previous({})
    return _Previous({bytes(h): vectors[i] for i, h in enumerate(hashes)}, hashes, meta.get("index"))


def _extend_index(out: Path, prev: _Previous, hashes: np.ndarray, vectors: np.ndarray, kind: str):
    """The old index plus the new rows, when the new rows only append to the old ones (else None)."""
    old = prev.hashes
    if (
        old is None
        or prev.kind != kind
        or len(old) > len(hashes)
        or not np.array_equal(old, hashes[: len(old)])
    ):
        return None
    try:
        index = vindex.read_index(out / "index.faiss")
    except SlimlmError:
        return None
    if index.ntotal != len(old) or index.d != vectors.shape[1]:
        return None
    if len(hashes) > len(old):
        index.add(np.ascontiguousarray(vectors[len(old) :]))
    return index


def build(
    replies_path: str | Path,
    out: str | Path,
    embedder,
    kind: str = "auto",
    batch_size: int = 64,
    progress=None,
) -> BuildReport:
    replies = read_replies(replies_path)
    texts, owners = rows_of(replies)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"--out {out} exists and is not a directory")
    hashes = _sha1(texts)
    prev = _previous(out, embedder.model_id, embedder.dim)
    vectors = np.empty((len(texts), embedder.dim), dtype=np.float32)
    todo = []
    for i, h in enumerate(hashes):
        v = prev.vectors.get(bytes(h))
        if v is None:
            todo.append(i)
        else:
            vectors[i] = v
    t0 = time.perf_counter()
    chunk = max(batch_size * 16, 1024)
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        vectors[rows] = embedder.encode_unit([texts[i] for i in rows], batch_size)
        if progress:
            progress(min(start + chunk, len(todo)), len(todo))
    embed_s = time.perf_counter() - t0
    kind = vindex.resolve_kind(kind, len(texts))
    t0 = time.perf_counter()
    # replies only appended: add their rows to the old index (an HNSW rebuild is the slow part)
    index = _extend_index(out, prev, hashes, vectors, kind)
    extended = index is not None
    if index is None:
        index = vindex.build_index(vectors, kind)
    index_s = time.perf_counter() - t0
    # write into a fresh directory, then swap it in: a reader never sees a half-written library
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with (tmp / "replies.jsonl").open("w", encoding="utf-8") as f:
        for r in replies:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    np.save(tmp / "vectors.npy", vectors)
    np.save(tmp / "owners.npy", np.asarray(owners, dtype=np.int32))
    np.save(tmp / "hashes.npy", hashes)
    vindex.write_index(index, tmp / "index.faiss")
    meta = {
        "format": FORMAT,
        "model": embedder.model_id,
        "dim": embedder.dim,
        "index": kind,
        "replies": len(replies),
        "rows": len(texts),
        "metric": "cosine",
    }
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return BuildReport(
        len(replies), len(texts), len(todo), len(texts) - len(todo), kind, embed_s, index_s, extended
    )


class Library:
    """A loaded library: search unit query vectors, get the best replies with cosine scores."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path
        meta_path = path / META
        if not meta_path.is_file():
            raise SlimlmError(
                f"{path} is not a guard library (no {META}); build one with: slimlm guard build replies.jsonl --out {path}"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            self.model_id = str(meta["model"])
            self.dim = int(meta["dim"])
            self.kind = str(meta["index"])
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')} (this slimlm reads {FORMAT})")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise SlimlmError(
                f"{meta_path} is damaged ({e}); rebuild the library with slimlm guard build"
            ) from None
        try:
            with (path / "replies.jsonl").open(encoding="utf-8") as f:
                self.replies = [
                    parse_reply(json.loads(line), f"{path}/replies.jsonl:{n}") for n, line in enumerate(f, 1)
                ]
            self.owners = np.load(path / "owners.npy")
        except (OSError, ValueError) as e:
            raise SlimlmError(f"the library {path} is incomplete or damaged ({e}); rebuild it") from None
        self.index = vindex.read_index(path / "index.faiss")
        if self.index.d != self.dim:
            raise SlimlmError(
                f"the library {path} is inconsistent: its index has dimension {self.index.d} but library.json says {self.dim}; rebuild it"
            )
        if (
            self.index.ntotal != len(self.owners)
            or not self.replies
            or int(self.owners.max()) >= len(self.replies)
        ):
            raise SlimlmError(f"the library {path} is inconsistent (index rows vs replies); rebuild it")
        self.by_id = {r.id: r for r in self.replies}
        # a reply with a stage matches only in that stage; replies without one match in every stage
        self.stages = sorted({r.stage for r in self.replies if r.stage is not None})
        self._row_stage = [self.replies[o].stage for o in self.owners.tolist()]
        self._selectors: dict[str, object] = {}

    def rows_for_stage(self, stage: str) -> np.ndarray:
        """Index rows that may match in `stage`: rows of replies with that stage or with none."""
        return np.array([i for i, s in enumerate(self._row_stage) if s is None or s == stage], dtype=np.int64)

    def _selector(self, stage: str | None):
        """None (every row) when no reply's stage excludes anything, else a faiss id selector."""
        if stage is None or not self.stages:
            return None
        if stage not in self._selectors:  # built once per stage; requests only read them
            rows = self.rows_for_stage(stage)
            self._selectors[stage] = vindex.selector(rows) if len(rows) < len(self.owners) else None
        return self._selectors[stage]

    def check_embedder(self, embedder) -> None:
        """The query vectors must come from the model the library was built with."""
        if embedder.dim != self.dim:
            raise SlimlmError(
                f"dimension mismatch: the library {self.path} was built with {self.model_id} ({self.dim} dimensions) "
                f"but the embedding model {embedder.model_id} gives {embedder.dim}; pass the same --embedding-model "
                "or rebuild the library with this one"
            )
        if embedder.model_id != self.model_id:
            raise SlimlmError(
                f"model mismatch: the library {self.path} was built with {self.model_id}, not {embedder.model_id}; "
                "pass the same --embedding-model or rebuild the library with this one"
            )

    def search(self, queries: np.ndarray, k: int = 5, stage: str | None = None) -> list[list[Hit]]:
        """The best `k` distinct replies per query, best first (a reply's score: its best row).
        With `stage`, only replies of that stage and replies without a stage can match; without it
        (a request that names no stage) every reply can."""
        scores, rows = vindex.search(self.index, queries, max(4 * k, 16), self._selector(stage))
        out = []
        for qs, qr in zip(scores, rows, strict=True):
            best: dict[int, Hit] = {}
            for s, r in zip(qs, qr, strict=True):
                if r < 0:
                    continue
                owner = int(self.owners[r])
                if owner not in best:
                    best[owner] = Hit(self.replies[owner], float(s), int(r))
                if len(best) == k:
                    break
            out.append(list(best.values()))
        return out
