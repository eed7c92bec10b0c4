"""The vector index: faiss, exact (IndexFlatIP) up to a size, HNSW (IndexHNSWFlat) above it.

Why faiss and these two kinds: docs/guard.md (measured with benchmarks/guard_bench.py). Vectors are
unit length, so inner product is cosine similarity for both kinds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.guard.embedder import require

KINDS = ("auto", "flat", "hnsw")
# Up to this many rows an exact scan is about as fast as HNSW, builds at once and misses nothing (docs/guard.md).
FLAT_MAX_ROWS = 20_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


def resolve_kind(kind: str, rows: int) -> str:
    if kind not in KINDS:
        raise SlimlmError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "auto":
        return "flat" if rows <= FLAT_MAX_ROWS else "hnsw"
    return kind


def build_index(vectors: np.ndarray, kind: str):
    faiss = require("faiss")
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def write_index(index, path: Path) -> None:
    require("faiss").write_index(index, str(path))


def read_index(path: Path):
    faiss = require("faiss")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise SlimlmError(
            f"cannot read the index {path} ({str(e).splitlines()[0][:200]}); rebuild the library"
        ) from None
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = HNSW_EF_SEARCH
    return index


class _Selector:
    """A faiss IDSelectorBatch with the id array it points into kept alive beside it."""

    def __init__(self, rows: np.ndarray) -> None:
        faiss = require("faiss")
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        self.sel = faiss.IDSelectorBatch(len(self.rows), faiss.swig_ptr(self.rows))


def selector(rows: np.ndarray) -> _Selector:
    """Restrict a search to these rows (exact for the flat index; HNSW walks the whole graph and
    keeps only these rows as results)."""
    return _Selector(rows)


def _params(index, sel: _Selector | None):
    if sel is None:
        return None
    faiss = require("faiss")
    if hasattr(index, "hnsw"):
        return faiss.SearchParametersHNSW(sel=sel.sel, efSearch=index.hnsw.efSearch)
    return faiss.SearchParameters(sel=sel.sel)


def search(index, queries: np.ndarray, k: int, sel: _Selector | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each [n, k]; missing neighbours have row -1. `sel`: only these rows."""
    k = max(1, min(k, index.ntotal))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    params = _params(index, sel)
    if len(queries) > 1:
        return index.search(queries, k, params=params)
    # one query on one thread: a parallel scan waits for every OpenMP thread to get a core, and on a
    # busy machine (an engine decoding beside it) that wait dwarfs the search (docs/guard.md).
    # The setting is per calling thread in OpenMP, so it is set (and restored) here.
    faiss = require("faiss")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k, params=params)
    finally:
        faiss.omp_set_num_threads(before)
