"""The public optimizers: which codec stores which moment of which parameter.

| class            | first moment m                       | second moment v                                 |
|------------------|--------------------------------------|-------------------------------------------------|
| AdamW8bit        | 8-bit signed dynamic, blocks of 256  | 8-bit unsigned dynamic without 0, blocks of 256 |
| AdamW4bit        | 4-bit signed dynamic-exponent, 128   | 4-bit zero-free linear, rank-1 (>=2-D) / 128    |
| AdamWFactor4bit  | 4-bit signed dynamic-exponent, 128   | factored row/col float32 (>=2-D) / 4-bit as above|

Parameters of at most `fp32_state_max_numel` (4096) elements keep both moments in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimlm.formats.optimizers import BLOCK_4BIT, BLOCK_8BIT
from slimlm.optim.adamw import LowBitAdamW
from slimlm.optim.codecs import (
    BlockwiseCodec,
    FactoredSecondMoment,
    Float32Codec,
    MomentCodec,
    Rank1Codec,
)
from slimlm.optim.qmaps import (
    signed_4bit_map,
    signed_8bit_map,
    zero_free_linear_map,
    zero_free_unsigned_8bit_map,
)
from slimlm.optim.quantize import CodeTable
from slimlm.optim.sharding import is_dtensor, shard_spec

SIGNED_4BIT = CodeTable(signed_4bit_map())
ZERO_FREE_4BIT = CodeTable(zero_free_linear_map(4))
SIGNED_8BIT = CodeTable(signed_8bit_map())
ZERO_FREE_8BIT = CodeTable(zero_free_unsigned_8bit_map())

FP32_CODECS = (Float32Codec("exp_avg"), Float32Codec("exp_avg_sq"))


def _four_bit_codecs(opt: LowBitAdamW, p: torch.Tensor, matrix_v: Callable[[], MomentCodec]):
    """The 4-bit AdamWs' codecs: m block-wise 4-bit; v of a >= 2-D tensor from `matrix_v` (rank-1 codes
    or factored means), of a 1-D tensor block-wise 4-bit; fp32 for small tensors."""
    if opt.keeps_fp32_state(p):
        return FP32_CODECS
    m_codec = BlockwiseCodec("exp_avg", SIGNED_4BIT, opt.block_size)
    if p.ndim >= 2:
        return m_codec, matrix_v()
    return m_codec, BlockwiseCodec("exp_avg_sq", ZERO_FREE_4BIT, opt.block_size)


class AdamW8bit(LowBitAdamW):
    """AdamW with 8-bit block-wise states (Dettmers et al. 2022): about 2 bytes per parameter instead of 8.

    Both moments: absmax per block of `block_size` (default 256, as bitsandbytes >= 0.44 and torchao;
    the paper and older bitsandbytes used 2048) over bitsandbytes' dynamic tree tables: signed for m,
    unsigned without its zero entry for v (see `zero_free_unsigned_8bit_map`).
    Same arguments as torch.optim.AdamW plus `block_size` and `fp32_state_max_numel`.
    """

    default_block_size = BLOCK_8BIT

    def moment_codecs(self, p: torch.Tensor) -> tuple[MomentCodec, MomentCodec]:
        if self.keeps_fp32_state(p):
            return FP32_CODECS
        return (
            BlockwiseCodec("exp_avg", SIGNED_8BIT, self.block_size),
            BlockwiseCodec("exp_avg_sq", ZERO_FREE_8BIT, self.block_size),
        )


class AdamW4bit(LowBitAdamW):
    """AdamW with 4-bit states (Li, Chen & Zhu, NeurIPS 2023): about 1 byte per parameter instead of 8.

    m: absmax per block of `block_size` (default 128) over the signed dynamic-exponent table, two codes per
    byte. v: zero-free linear table (k/16, k=1..16) normalized rank-1 (min of row-max and column-max; one
    max vector per dim for >2-D tensors), or per block of `block_size` for 1-D tensors.
    Same arguments as torch.optim.AdamW plus `block_size` and `fp32_state_max_numel`.
    """

    default_block_size = BLOCK_4BIT

    def moment_codecs(self, p: torch.Tensor) -> tuple[MomentCodec, MomentCodec]:
        return _four_bit_codecs(self, p, lambda: Rank1Codec("exp_avg_sq", ZERO_FREE_4BIT))


class AdamWFactor4bit(LowBitAdamW):
    """4-bit AdamW with an Adafactor-style factorized second moment for tensors of >= 2 dims (Li et al. 2023).

    m as in AdamW4bit. v of a >=2-D tensor: float32 running means of g^2 per row and per column
    (sublinear memory); 1-D tensors: as in AdamW4bit. About 0.5 bytes per parameter. Under FSDP2 the row
    statistics of a 2-D weight stay with the rank that owns the rows and the column statistics are summed
    over ranks each step, so the factorization is that of the whole matrix (slimlm.optim.sharding).
    Same arguments as torch.optim.AdamW plus `block_size` and `fp32_state_max_numel`.
    """

    default_block_size = BLOCK_4BIT

    def moment_codecs(self, p: torch.Tensor) -> tuple[MomentCodec, MomentCodec]:
        return _four_bit_codecs(
            self, p, lambda: FactoredSecondMoment("exp_avg_sq", shard_spec(p) if is_dtensor(p) else None)
        )
