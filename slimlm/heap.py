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


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot (nothing done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
