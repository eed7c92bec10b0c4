"""KV caches. The model only calls `cache.attend(layer, q, k, v, meta)`; these classes differ in storage."""

from __future__ import annotations

import sys

import torch

from slimlm.config import ModelConfig
from slimlm.formats import kv as _formats
from slimlm.formats.dtypes import FLOAT_BYTES, TORCH_NAMES, kv_dtype_name
from slimlm.kv.paged import PagedKVCache

# The KV formats' table moved to slimlm.formats.kv (torch-free, with the other formats); the old path still imports.
sys.modules.setdefault("slimlm.kv.formats", _formats)

_FLOAT_KV = {name: getattr(torch, TORCH_NAMES[name]) for name in FLOAT_BYTES}


def kv_cache_class(kv_dtype: str) -> type[PagedKVCache]:
    kv_dtype = kv_dtype_name(kv_dtype)  # the one check (EngineConfig's); library callers come here directly
    if kv_dtype in ("auto", *_FLOAT_KV):
        return PagedKVCache
    import slimlm.kv.kivi  # noqa: F401  (adds "int4" to the table; kivi imports quantized, not back)
    from slimlm.kv.quantized import QUANTIZED_CACHES

    return QUANTIZED_CACHES[kv_dtype]


def kv_storage_dtype(kv_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The element type a float cache stores (quantized caches ignore it)."""
    return _FLOAT_KV.get(kv_dtype, compute_dtype)


def staging_slots(max_seqs: int, block_size: int = 16, kv_dtype: str = "int4") -> int:
    """bf16 staging slots of the int4 pool (slimlm/kv/kivi.py) for `max_seqs` running sequences."""
    return _formats.KV_FORMATS[kv_dtype].staging_slots(max_seqs, block_size)


def make_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    kv_dtype: str,
    compute_dtype: torch.dtype,
    device,
    max_seqs: int | None = None,
) -> PagedKVCache:
    cls = kv_cache_class(kv_dtype)
    extra = {}
    if getattr(cls.__dict__.get("format"), "key_channels", False) and max_seqs is not None:
        extra["staging_slots"] = staging_slots(max_seqs, block_size, kv_dtype_name(kv_dtype))
    cache = cls(
        config,
        num_blocks,
        block_size,
        dtype=kv_storage_dtype(kv_dtype, compute_dtype),
        device=device,
        **extra,
    )
    cache.kv_dtype = kv_dtype if kv_dtype != "auto" else {v: k for k, v in _FLOAT_KV.items()}[compute_dtype]
    return cache
