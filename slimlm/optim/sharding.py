"""What an optimizer step needs to know about a parameter sharded by FSDP2 (a DTensor on a device mesh).

The low-bit codecs work on each rank's local shard as if it were a whole tensor: block-wise codes and
their absmax scales cover the local elements only, and rank-1 normalizers take their maxima over the local
rows. That changes only the quantization scales, never the AdamW arithmetic.

The factored second moment is different: its row and column statistics are *means over the parameter*,
and FSDP2 shards along dim 0, so for a 2-D weight each rank sees only some rows. Kept local, the column
means (and the mean of the row means used to normalize) would describe a different matrix on each rank and
the update would depend on the number of ranks. `ShardSpec` therefore lets the codec sum those statistics
over the shard group (one all-reduce of `columns + 1` floats per matrix per step) and divide by the global
row count, so a sharded run takes the same steps as one process. Row statistics stay local (each rank owns
its rows); the column vector is the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """Where a local shard sits in its global parameter: rows [row_offset, row_offset + rows) of dim 0."""

    global_shape: tuple[int, ...]
    row_offset: int
    group: object | None  # the process group that holds the other shards (None: not sharded)

    @property
    def sharded(self) -> bool:
        return self.group is not None


def is_dtensor(p: torch.Tensor) -> bool:
    return hasattr(p, "device_mesh") and hasattr(p, "to_local")


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank updates: the local shard of a DTensor (a view, so in-place updates land in p)."""
    return p._local_tensor if is_dtensor(p) else p


def shard_spec(p: torch.Tensor) -> ShardSpec:
    """Global shape and row offset of p's local shard; only FSDP2's Shard(0) placements are supported."""
    if not is_dtensor(p):
        return ShardSpec(tuple(p.shape), 0, None)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sharded = [i for i, placement in enumerate(p.placements) if not isinstance(placement, Replicate)]
    if any(not (isinstance(p.placements[i], Shard) and p.placements[i].dim == 0) for i in sharded):
        from slimlm.errors import SlimlmError

        raise SlimlmError(
            f"the low-bit optimizers support parameters sharded along dim 0 (FSDP2's default), got {p.placements}"
        )
    if len(sharded) > 1:
        from slimlm.errors import SlimlmError

        raise SlimlmError("the low-bit optimizers support one sharded mesh dim (FSDP2, not HSDP)")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    group = p.device_mesh.get_group(sharded[0]) if sharded else None
    return ShardSpec(tuple(p.shape), int(offset[0]) if offset else 0, group)


def sum_over_shards(t: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """t summed over the ranks of the shard group (in place); unchanged when not sharded."""
    if spec is not None and spec.sharded:
        import torch.distributed as dist

        dist.all_reduce(t, group=spec.group)
    return t
