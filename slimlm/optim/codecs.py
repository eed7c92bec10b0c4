"""How one Adam moment of one parameter is stored: plain float32, block-wise codes, rank-1 codes, factored.

Every codec keeps its state as plain tensors under `prefix_*` keys of the optimizer's per-parameter state
dict, so torch's state_dict machinery saves and loads them unchanged. `decode` returns a float32 tensor the
step may update in place; `encode` stores the updated value back. `ema_square` (second moments) folds in
the new squared gradient: v <- beta2 * v + (1 - beta2) * g^2.
"""

from __future__ import annotations

import torch

from slimlm.formats.optimizers import (
    StateLayout,
    blockwise_layout,
    factored_layout,
    float32_layout,
    rank1_layout,
)
from slimlm.optim.quantize import (
    TINY,
    CodeTable,
    blockwise_decode,
    blockwise_encode,
    rank1_decode,
    rank1_encode,
)
from slimlm.optim.sharding import ShardSpec, sum_over_shards

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _torch(layout: StateLayout) -> Layout:
    """slimlm.formats.optimizers' layouts (which the planner counts) with torch dtypes."""
    return {key: (shape, getattr(torch, dtype)) for key, (shape, dtype) in layout.items()}


class MomentCodec:
    """Interface and the shared `ema_square` of non-factored codecs."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def layout(self, p: torch.Tensor) -> Layout:
        """State keys with their shapes and dtypes for parameter p (used to check loaded states)."""
        raise NotImplementedError

    def init(self, state: dict, p: torch.Tensor) -> None:
        for key, (shape, dtype) in self.layout(p).items():
            state[key] = torch.zeros(shape, dtype=dtype, device=p.device)

    def decode(self, state: dict, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, state: dict, p: torch.Tensor, value: torch.Tensor) -> None:
        raise NotImplementedError

    def ema_square(self, state: dict, p: torch.Tensor, grad: torch.Tensor, beta2: float) -> torch.Tensor:
        v = self.decode(state, p)
        return v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


class Float32Codec(MomentCodec):
    """The moment as a float32 tensor shaped like the parameter (small tensors; updated in place)."""

    def layout(self, p: torch.Tensor) -> Layout:
        return _torch(float32_layout(self.prefix, tuple(p.shape)))

    def decode(self, state: dict, p: torch.Tensor) -> torch.Tensor:
        return state[self.prefix]

    def encode(self, state: dict, p: torch.Tensor, value: torch.Tensor) -> None:
        if value is not state[self.prefix]:
            state[self.prefix].copy_(value)


class BlockwiseCodec(MomentCodec):
    """Codes of x / absmax(block) in a code table, blocks of `block_size` consecutive elements (flattened).

    Keys: `{prefix}_codes` (uint8; two 4-bit codes per byte when the table has <= 16 entries) and
    `{prefix}_absmax` (float32, one per block). The last block is zero-padded.
    """

    def __init__(self, prefix: str, table: CodeTable, block_size: int) -> None:
        super().__init__(prefix)
        self.table = table
        self.block_size = block_size
        self.packed = table.values.numel() <= 16
        self.nonnegative = bool(table.values[0] >= 0)

    def layout(self, p: torch.Tensor) -> Layout:
        return _torch(blockwise_layout(self.prefix, p.numel(), self.block_size, self.packed))

    def decode(self, state: dict, p: torch.Tensor) -> torch.Tensor:
        codes, absmax = state[f"{self.prefix}_codes"], state[f"{self.prefix}_absmax"]
        return blockwise_decode(codes, absmax, self.table.tensors(p.device), p.shape, self.packed)

    def encode(self, state: dict, p: torch.Tensor, value: torch.Tensor) -> None:
        tables = self.table.tensors(p.device)
        codes, absmax = blockwise_encode(value, tables, self.block_size, self.packed, self.nonnegative)
        state[f"{self.prefix}_codes"] = codes
        state[f"{self.prefix}_absmax"] = absmax


class Rank1Codec(MomentCodec):
    """4-bit codes of x / min_d(max over all dims but d), for tensors of >= 2 dims (Li et al. 2023).

    Keys: `{prefix}_codes` (uint8, two codes per byte, flattened, padded to even length) and
    `{prefix}_max{d}` (float32 of length shape[d]) for each dim d.
    """

    def __init__(self, prefix: str, table: CodeTable) -> None:
        super().__init__(prefix)
        if table.values.numel() > 16:
            raise ValueError("rank-1 codes are packed two per byte: the table needs <= 16 entries")
        self.table = table

    def layout(self, p: torch.Tensor) -> Layout:
        return _torch(rank1_layout(self.prefix, tuple(p.shape)))

    def decode(self, state: dict, p: torch.Tensor) -> torch.Tensor:
        maxima = [state[f"{self.prefix}_max{d}"] for d in range(p.ndim)]
        return rank1_decode(state[f"{self.prefix}_codes"], maxima, self.table.tensors(p.device))

    def encode(self, state: dict, p: torch.Tensor, value: torch.Tensor) -> None:
        codes, maxima = rank1_encode(value, self.table.tensors(p.device))
        state[f"{self.prefix}_codes"] = codes
        for d, vec in enumerate(maxima):
            state[f"{self.prefix}_max{d}"] = vec


class FactoredSecondMoment(MomentCodec):
    """Adafactor's factorization for tensors of >= 2 dims: running means of g^2 over the last dim (`_row`,
    shape[:-1]) and over the second-to-last dim (`_col`, shape[:-2] + shape[-1:]), float32.

    v is approximated by row / mean(row) (outer) col. Non-finite g^2 enter the means as 0, so a NaN or Inf
    gradient makes only its own parameter element NaN, as in torch's AdamW.

    `shard`: for a 2-D weight whose rows are sharded (FSDP2), the column means and the mean of the row
    statistics are summed over the shard group and divided by the global row count, so every rank uses the
    statistics of the whole matrix (see slimlm.optim.sharding). Rows stay local; columns are replicated.
    """

    def __init__(self, prefix: str, shard: ShardSpec | None = None) -> None:
        super().__init__(prefix)
        self.shard = shard if shard is not None and shard.sharded and len(shard.global_shape) == 2 else None

    def layout(self, p: torch.Tensor) -> Layout:
        return _torch(factored_layout(self.prefix, tuple(p.shape)))

    def ema_square(self, state: dict, p: torch.Tensor, grad: torch.Tensor, beta2: float) -> torch.Tensor:
        row, col = state[f"{self.prefix}_row"], state[f"{self.prefix}_col"]
        square = (grad * grad).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        row.mul_(beta2).add_(square.mean(dim=-1), alpha=1 - beta2)
        if self.shard is None:
            col.mul_(beta2).add_(square.mean(dim=-2), alpha=1 - beta2)
            row_mean = row.mean(dim=-1, keepdim=True)
        else:  # sums over this rank's rows, then over all ranks: one all-reduce of columns + 1 floats
            sums = sum_over_shards(torch.cat((square.sum(dim=-2), row.sum().view(1))), self.shard)
            rows = self.shard.global_shape[0]
            col.mul_(beta2).add_(sums[:-1], alpha=(1 - beta2) / rows)
            row_mean = sums[-1:] / rows
        row_factor = row / row_mean.clamp_min(TINY)
        v = row_factor.unsqueeze(-1) * col.unsqueeze(-2)
        # 0 * g^2 is NaN exactly where g is not finite: that element's update is NaN, as in torch's AdamW.
        return v.addcmul_(grad, grad, value=0.0)

    def encode(self, state: dict, p: torch.Tensor, value: torch.Tensor) -> None:
        pass  # ema_square already updated the factors in place
