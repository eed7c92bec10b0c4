"""Give the C heap's free pages back to the OS after a phase that freed many large blocks.

glibc returns freed memory to the OS only from the top of its heap (and mmapped blocks). Tensors freed in
the middle of the heap stay resident: laying a bf16 model's linears out (q/k/v and gate/up copied into
one tensor each, the parts freed) left ~130 MiB of SmolLM2-135M's 650 MiB resident as free heap
(docs/engine.md, "Peak RSS: where it goes"). `malloc_trim(0)` hands those pages back
(MADV_DONTNEED on the free chunks' whole pages); it costs well under a millisecond on a heap this size.
Elsewhere (macOS, musl) there is no such call and this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys


def _glibc(name: str, argtypes: tuple):
    """glibc's function `name` (returning int), or None elsewhere (macOS, musl: no such call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def _malloc_trim():
    return _glibc("malloc_trim", (ctypes.c_size_t,))


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot (nothing done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_TRIM_BYTES = 256 << 20  # free heap top kept before glibc gives it back
KEEP_MMAP_BYTES = 64 << 20  # allocations from here up still get their own mapping


@functools.cache
def keep_freed_heap() -> bool:
    """Keep freed activation memory for the next step instead of handing it back to the OS at each free.

    By default glibc maps every block above a (self-adjusting) threshold on its own and unmaps it on free,
    and trims the heap's top whenever a few MiB lie free there, so every prefill step faulted its
    activations' pages in afresh (how many, and what it cost: docs/engine.md, "Fifth pass"). Fixed
    thresholds make those blocks come from the heap and stay there, up to KEEP_TRIM_BYTES of free top.
    Blocks of KEEP_MMAP_BYTES and more (a big model's weights, the KV pool) are still mapped on their own,
    and `release_free_heap` still returns everything free on request. Process-wide, set once (the engine calls it after its pool is allocated);
    False where the C library has no mallopt (nothing done).
    """
    mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    # Older glibc caps the mmap threshold at 32 MiB (half its heap size): take what it allows.
    mapped = mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_BYTES) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mapped and mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_BYTES))
