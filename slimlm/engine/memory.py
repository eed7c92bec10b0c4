"""How many KV blocks fit: the budget arithmetic, and a readable report of what was allocated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError


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
    if kv_cache_tokens is not None:
        blocks = -(-kv_cache_tokens // block_size)
        source = f"--kv-cache-tokens {kv_cache_tokens}"
    elif kv_cache_bytes is not None:
        blocks = kv_cache_bytes // block_bytes
        source = f"--kv-cache-bytes {kv_cache_bytes}"
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
    return KVBudget(blocks, block_bytes, source)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
