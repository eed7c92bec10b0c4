"""Quantized paged KV pools (LMDeploy's quant_policy 8 and 4): int8 or packed int4 codes per token and head,
with an fp16 scale and a uint8 zero point beside every block.

Quantized on write (`_store`), dequantized to the compute dtype on read (`_load`): only the blocks a step
gathers are dequantized. Attention, batching, prefix caching and preemption are the paged pool's own; every
attention, prefill included, reads K/V as stored, so a token's output does not depend on how it was batched.

The pool holds K and V turned by an orthogonal R (see `quant_ops`): attention with q R over K R, V R gives
out R, since (q R)(k R)^T = q k^T; `attend` turns q and the new k, v on the way in and the output back.
"""

from __future__ import annotations

import torch

from slimlm.config import ModelConfig
from slimlm.kv.metadata import AttnMetadata
from slimlm.kv.paged import PagedKVCache, gather_blocks
from slimlm.kv.quant_ops import (
    SCALE_DTYPE,
    ZERO_DTYPE,
    bytes_per_token_head,
    check_bits,
    dequantize,
    packed_dim,
    quantize,
    rotation_matrix,
)


class QuantizedPagedKVCache(PagedKVCache):
    """Paged pool whose K and V are stored as `bits`-bit codes; `dtype` is the compute dtype of reads.

    Token-major, [layers, blocks, block_size, KVH, ...]: a token's codes, scale and zero sit together.
    """

    bits: int = 8
    block_dim = 1

    def _allocate(self, num_layers: int, device) -> None:
        check_bits(self.bits, self.head_dim)
        tokens = (num_layers, self.num_blocks, self.block_size, self.num_kv_heads)
        codes = (*tokens, packed_dim(self.head_dim, self.bits))
        self.k_codes = torch.empty(codes, dtype=torch.uint8, device=device)
        self.v_codes = torch.empty(codes, dtype=torch.uint8, device=device)
        # zeros, not empty: decode reads padded slots (masked out), and garbage fp16 there could be NaN,
        # which a mask does not remove (0 * NaN). Codes are any byte and stay harmless, so they stay lazy.
        self.k_scale = torch.zeros(tokens, dtype=SCALE_DTYPE, device=device)
        self.v_scale = torch.zeros(tokens, dtype=SCALE_DTYPE, device=device)
        self.k_zero = torch.zeros(tokens, dtype=ZERO_DTYPE, device=device)
        self.v_zero = torch.zeros(tokens, dtype=ZERO_DTYPE, device=device)
        self.rotation = rotation_matrix(self.head_dim).to(device)  # [D, D] float32, orthogonal

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        rot = self.rotation
        # Turned in float32 (two extra roundings in bf16 would cost as much as the bf16 cache itself);
        # k and v stay float32, quantize() reads them as such.
        out = super().attend(layer, (q.float() @ rot).to(q.dtype), k.float() @ rot, v.float() @ rot, meta)
        return (out.float() @ rot.T).to(q.dtype)

    def _parts(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(codes, scale, zero) of K, and of V."""
        return (self.k_codes, self.k_scale, self.k_zero), (self.v_codes, self.v_scale, self.v_zero)

    def _store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for x, (codes, scale, zero) in zip((k, v), self._parts(), strict=True):
            q, s, z = quantize(x, self.bits)  # [T, KVH, Dp], [T, KVH], [T, KVH]
            codes[layer].view(-1, self.num_kv_heads, codes.shape[-1]).index_copy_(0, slots, q)
            scale[layer].view(-1, self.num_kv_heads).index_copy_(0, slots, s)
            zero[layer].view(-1, self.num_kv_heads).index_copy_(0, slots, z)

    def _load(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks: [..., n] block ids -> K, V [KVH, ..., n * block_size, D] (heads first), compute dtype."""
        k_parts, v_parts = self._parts()
        return self._read(layer, blocks, k_parts), self._read(layer, blocks, v_parts)

    def _read(self, layer: int, blocks: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        codes, scale, zero = (gather_blocks(t[layer], blocks) for t in parts)
        values = dequantize(codes, scale, zero, self.bits, self.compute_dtype).flatten(
            -4, -3
        )  # [..., L, KVH, D]
        return values.movedim(-2, 0)

    @classmethod
    def bytes_per_block(cls, config: ModelConfig, block_size: int, dtype: torch.dtype | None = None) -> int:
        """Exact bytes of one block over all layers, K and V; `dtype` (the compute dtype) does not matter."""
        check_bits(cls.bits, config.head_dim)
        per_token_head = bytes_per_token_head(config.head_dim, cls.bits)
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * per_token_head

    def storage_tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.v_codes, self.k_scale, self.v_scale, self.k_zero, self.v_zero]


class Int8PagedKVCache(QuantizedPagedKVCache):
    """quant_policy 8: one byte per value."""

    bits = 8


class Int4PagedKVCache(QuantizedPagedKVCache):
    """quant_policy 4: two values per byte."""

    bits = 4


QUANTIZED_CACHES: dict[str, type[QuantizedPagedKVCache]] = {
    "int8": Int8PagedKVCache,
    "int4": Int4PagedKVCache,
}
