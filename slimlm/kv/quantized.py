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
from slimlm.formats.kv import KV_FORMATS, KVFormat
from slimlm.kv.metadata import AttnMetadata
from slimlm.kv.paged import PagedKVCache, gather_blocks
from slimlm.kv.quant_ops import (
    SCALE_DTYPE,
    ZERO_DTYPE,
    check_bits,
    dequantize,
    groups_of,
    packed_dim,
    quantize,
    rotation_matrix,
)


class QuantizedPagedKVCache(PagedKVCache):
    """Paged pool whose K and V are stored as `k_bits`/`v_bits`-bit codes; `dtype` is the compute dtype.

    Token-major, [layers, blocks, block_size, KVH, ...]: a token's codes, scales and zeros sit together;
    one scale and zero per `group` channels of a head (0: one for the whole head), where it divides.
    """

    format: KVFormat = KV_FORMATS["int8"]
    block_dim = 1

    @property
    def k_bits(self) -> int:
        return self.format.k_bits

    @property
    def v_bits(self) -> int:
        return self.format.v_bits

    def _allocate(self, num_layers: int, device) -> None:
        self.k_group, self.v_group = self.format.groups(self.head_dim)
        for bits, group in ((self.k_bits, self.k_group), (self.v_bits, self.v_group)):
            check_bits(bits, self.head_dim, group)
        tokens = (num_layers, self.num_blocks, self.block_size, self.num_kv_heads)
        self.k_codes = torch.empty(
            (*tokens, packed_dim(self.head_dim, self.k_bits)), dtype=torch.uint8, device=device
        )
        self.v_codes = torch.empty(
            (*tokens, packed_dim(self.head_dim, self.v_bits)), dtype=torch.uint8, device=device
        )
        kg, vg = groups_of(self.head_dim, self.k_group), groups_of(self.head_dim, self.v_group)
        # zeros, not empty: decode reads padded slots (masked out), and garbage fp16 there could be NaN,
        # which a mask does not remove (0 * NaN). Codes are any byte and stay harmless, so they stay lazy.
        self.k_scale = torch.zeros((*tokens, kg), dtype=SCALE_DTYPE, device=device)
        self.v_scale = torch.zeros((*tokens, vg), dtype=SCALE_DTYPE, device=device)
        self.k_zero = torch.zeros((*tokens, kg), dtype=ZERO_DTYPE, device=device)
        self.v_zero = torch.zeros((*tokens, vg), dtype=ZERO_DTYPE, device=device)
        self.rotation = rotation_matrix(self.head_dim).to(device)  # [D, D] float32, orthogonal

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        rot = self.rotation
        # Turned in float32 (two extra roundings in bf16 would cost as much as the bf16 cache itself);
        # k and v stay float32, quantize() reads them as such.
        out = super().attend(layer, (q.float() @ rot).to(q.dtype), k.float() @ rot, v.float() @ rot, meta)
        return (out.float() @ rot.T).to(q.dtype)

    def _parts(self) -> tuple[tuple, tuple]:
        """(codes, scale, zero, bits, group) of K, and of V."""
        return (
            (self.k_codes, self.k_scale, self.k_zero, self.k_bits, self.k_group),
            (self.v_codes, self.v_scale, self.v_zero, self.v_bits, self.v_group),
        )

    def _store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        h = self.num_kv_heads
        for x, (codes, scale, zero, bits, group) in zip((k, v), self._parts(), strict=True):
            q, s, z = quantize(x, bits, group)  # [T, KVH, Dp], [T, KVH, G], [T, KVH, G]
            codes[layer].view(-1, h, codes.shape[-1]).index_copy_(0, slots, q)
            scale[layer].view(-1, h, scale.shape[-1]).index_copy_(0, slots, s.view(*q.shape[:2], -1))
            zero[layer].view(-1, h, zero.shape[-1]).index_copy_(0, slots, z.view(*q.shape[:2], -1))

    def _load(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks: [..., n] block ids -> K, V [KVH, ..., n * block_size, D] (heads first), compute dtype."""
        k_parts, v_parts = self._parts()
        return self._read(layer, blocks, k_parts), self._read(layer, blocks, v_parts)

    def _read(self, layer: int, blocks: torch.Tensor, parts: tuple) -> torch.Tensor:
        codes, scale, zero = (gather_blocks(t[layer], blocks) for t in parts[:3])
        values = dequantize(codes, scale, zero, parts[3], self.compute_dtype)  # [..., n, bs, KVH, D]
        return values.flatten(-4, -3).movedim(-2, 0)

    @classmethod
    def bytes_per_block(cls, config: ModelConfig, block_size: int, dtype: torch.dtype | None = None) -> int:
        """Exact bytes of one block over all layers, K and V; `dtype` (the compute dtype) does not matter."""
        return cls.format.block_bytes(config, block_size)

    def storage_tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.v_codes, self.k_scale, self.v_scale, self.k_zero, self.v_zero]


class Int8PagedKVCache(QuantizedPagedKVCache):
    """quant_policy 8: one byte per value, one scale per token and head."""

    format = KV_FORMATS["int8"]


class K8V4PagedKVCache(QuantizedPagedKVCache):
    """Keys at 8 bits, values at 4: key errors move every attention weight, value errors average out."""

    format = KV_FORMATS["k8v4"]


QUANTIZED_CACHES: dict[str, type[QuantizedPagedKVCache]] = {
    "int8": Int8PagedKVCache,
    "k8v4": K8V4PagedKVCache,
}


def __getattr__(name: str):
    if name == "Int4PagedKVCache":  # the int4 pool lives in slimlm/kv/kivi.py
        from slimlm.kv.kivi import Int4KiviPagedKVCache

        return Int4KiviPagedKVCache
    raise AttributeError(name)
