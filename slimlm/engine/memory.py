"""How many KV blocks fit: the budget arithmetic, and a readable report of what was allocated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.sizes import format_bytes

T = TypeVar("T")


def free_memory_bytes(device: torch.device) -> int:
    """Memory free now: what CUDA reports for a GPU, MemAvailable from /proc/meminfo for the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class KVBudget:
    num_blocks: int
    block_bytes: int
    source: str  # how the budget was chosen, for the report
    flag: str = "--cache-max-entry-count"  # the option that sets it: what to lower when it does not fit

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes


def plan_kv_blocks(
    *,
    block_bytes: int,
    block_size: int,
    free_bytes: int,
    cache_max_entry_count: float,
    kv_cache_tokens: int | None,
    kv_cache_bytes: int | None,
    max_num_seqs: int,
    max_model_len: int,
) -> KVBudget:
    """Blocks for the pool. A fraction budget is capped at max_num_seqs full-length sequences
    (more could never be in use at once), so a small model does not reserve most of the machine."""
    flag = "--cache-max-entry-count"
    if kv_cache_tokens is not None:
        blocks = -(-kv_cache_tokens // block_size)
        source = flag = f"--kv-cache-tokens {kv_cache_tokens}"
    elif kv_cache_bytes is not None:
        blocks = kv_cache_bytes // block_bytes
        source = flag = f"--kv-cache-bytes {kv_cache_bytes}"
    else:
        blocks = int(free_bytes * cache_max_entry_count) // block_bytes
        cap = max_num_seqs * -(-max_model_len // block_size)
        source = f"{cache_max_entry_count:g} x free memory ({free_bytes / 2**30:.1f} GiB)"
        if blocks > cap:
            blocks = cap
            source += f", capped at {max_num_seqs} seqs x {max_model_len} tokens"
    if blocks < 1:
        raise SlimlmError(
            f"the KV budget holds no block: one block of {block_size} tokens needs {block_bytes} bytes; "
            "raise --kv-cache-tokens/--kv-cache-bytes/--cache-max-entry-count"
        )
    return KVBudget(blocks, block_bytes, source, flag.split()[0])


def allocate_kv_pool(allocate: Callable[[], T], budget: KVBudget, free_bytes: int, device: torch.device) -> T:
    """Run `allocate` (which builds the pool), turning "cannot allocate" into what was asked, what is
    free and which option to lower. An explicit budget larger than the free memory is refused first:
    CPU pools are allocated lazily, so it would only fail later, when the blocks are filled."""
    asked = f"the KV pool needs {format_bytes(budget.nbytes)} ({budget.num_blocks} blocks; budget: {budget.source})"
    if budget.flag != "--cache-max-entry-count" and budget.nbytes > free_bytes:
        raise SlimlmError(
            f"{asked} but only {format_bytes(free_bytes)} is free on {device}; lower {budget.flag}"
        )
    try:
        return allocate()
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError | torch.OutOfMemoryError):
            raise
        raise SlimlmError(
            f"{asked} and it could not be allocated ({format_bytes(free_bytes)} free on {device}, or a "
            f"process memory limit such as ulimit -v); lower {budget.flag}"
        ) from None
