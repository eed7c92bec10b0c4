"""The engine's paged KV pool: fixed-size blocks per layer, addressed through per-sequence block tables.

Storage formats (bf16/fp16/fp32 here, int8/int4 in `slimlm.kv.quantized`) override `_store` and `_load`;
the attention logic is shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimlm.config import ModelConfig
from slimlm.kv.attention import attend_decode_batch, attend_one, causal_mask, decode_mask
from slimlm.kv.metadata import AttnMetadata


def gather_blocks(pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """pool [num_blocks, ...], blocks [..., n] -> [..., n, ...]; index_select, because it beats advanced
    indexing for the decode gather (docs/measured_choices.md)."""
    return pool.index_select(0, blocks.reshape(-1)).view(*blocks.shape, *pool.shape[1:])


class PagedKVCache:
    """Pool of `num_blocks` blocks of `block_size` tokens for every layer, K and V.

    Float pools are laid out heads first, [layers, KVH, blocks, block_size, D], so the blocks a decode
    step gathers are already the [KVH, B, L, D] operand of the attention matmuls.
    """

    block_dim = 2  # the dimension of every storage tensor that indexes blocks

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.compute_dtype = dtype
        self.scale = config.attn_scale
        self.sliding_window = config.sliding_window
        # Per layer: Gemma 3 interleaves sliding-window and global layers.
        self.windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
        self.softcap = config.attn_logit_softcapping
        self._allocate(config.num_hidden_layers, device)
        # Storage is allocated lazily (torch.empty), so a block is zeroed the first time it is handed out:
        # decode reads the unwritten tail of a block (masked), and garbage there could be NaN/Inf,
        # which a mask does not remove (0 * NaN = NaN).
        self._never_used = set(range(num_blocks))

    # ---- storage format: subclasses replace these three ----
    def _allocate(self, num_layers: int, device) -> None:
        shape = (num_layers, self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)
        # empty, not zeros: pages are committed by the OS only when first written.
        self.k = torch.empty(shape, dtype=self.compute_dtype, device=device)
        self.v = torch.empty(shape, dtype=self.compute_dtype, device=device)
        self._head_offsets = torch.arange(self.num_kv_heads, device=device)[:, None] * self.num_blocks
        self._rows_of: torch.Tensor | None = None  # the block table `_rows` was built from

    def _store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for pool, x in ((self.k, k), (self.v, v)):  # x: [T, KVH, D]
            flat = pool[layer].view(self.num_kv_heads, -1, self.head_dim)  # [KVH, blocks * bs, D]
            x = x if x.dtype == pool.dtype else x.to(pool.dtype)
            flat.index_copy_(1, slots, x.transpose(0, 1))

    def _load(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks: [..., n] block ids -> K, V [KVH, ..., n * block_size, D] (heads first), compute dtype."""
        # One row per (head, block) of the flattened [KVH * blocks, block_size * D] pool: index_select
        # over dim 0 copies whole rows, faster than selecting over the block dim (docs/measured_choices.md).
        if blocks is not self._rows_of:  # decode passes one table to every layer of a step: index it once
            self._rows_of, self._rows = blocks, (self._head_offsets + blocks.reshape(1, -1)).view(-1)
        rows = self._rows
        out_shape = (self.num_kv_heads, *blocks.shape[:-1], blocks.shape[-1] * self.block_size, self.head_dim)
        return tuple(
            pool[layer].view(-1, self.block_size * self.head_dim).index_select(0, rows).view(out_shape)
            for pool in (self.k, self.v)
        )

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * elem

    # ---- shared ----
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage_tensors())

    def storage_tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def prepare_blocks(self, block_ids) -> None:
        """Zero any of these blocks that was never used before; cheap after the first touch."""
        fresh = [b for b in block_ids if b in self._never_used]
        if not fresh:
            return
        self._never_used.difference_update(fresh)
        index = torch.tensor(fresh, device=self.storage_tensors()[0].device)
        for tensor in self.storage_tensors():
            tensor.index_fill_(self.block_dim, index, 0)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        self._store(layer, meta.slot_mapping, k, v)
        tables = meta.block_tables
        window = self.windows[layer]
        if meta.is_decode:
            mask_key = f"paged_mask_{window}"
            if mask_key not in meta.step_cache:  # once per step, shared by every layer
                meta.step_cache[mask_key] = self._decode_mask(meta, tables.shape[1], q.device, window)
                meta.step_cache["paged_tables"] = tables.clamp(min=0)  # -1 padding reads block 0, masked
            mask, tables = meta.step_cache[mask_key], meta.step_cache["paged_tables"]
            keys, values = self._load(layer, tables)  # [KVH, B, L, D]
            if meta.num_seqs == 1:  # one sequence: cut its context out instead of masking padding
                ctx = meta.context_lens[0]
                lo = 0 if window is None else max(0, ctx - window)
                keys, values, mask = keys[:, :, lo:ctx], values[:, :, lo:ctx], None
            if keys.dtype != q.dtype:  # an fp32 pool under a bf16 model, say
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            return attend_decode_batch(q, keys, values, mask, self.scale, self.softcap)
        if not self.softcap and meta.query_lens == meta.context_lens:  # prompts with nothing cached
            return self._attend_fresh(layer, q, tables, meta.query_lens, window)
        outs = []
        start = 0
        for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens, strict=True)):
            n_blocks = -(-ctx // self.block_size)
            keys, values = self._load(layer, tables[i, :n_blocks])  # [KVH, L, D]
            outs.append(
                attend_one(
                    q[start : start + q_len],
                    keys[:, :ctx].transpose(0, 1).to(q.dtype),
                    values[:, :ctx].transpose(0, 1).to(q.dtype),
                    self.scale,
                    window,
                    self.softcap,
                )
            )
            start += q_len
        return torch.cat(outs, dim=0)

    def _attend_fresh(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: list[int], window: int | None
    ) -> torch.Tensor:
        """Prefill of prompts with no cached prefix: the sequences of one length share one causal SDPA
        call (a batch dimension), instead of one call per sequence and layer.

        Keys and values are read back from the pool as stored, as the per-sequence path does, and each
        sequence's rows go through the same kernel on the same shapes, so the result is bit for bit the
        per-sequence one (tests/test_kv_fresh_prefill.py). Lengths are not padded to one another:
        padding would change the flash kernel's blocking and the rounding with it.
        """
        h, d = q.shape[1], q.shape[2]
        starts = [0]
        for n in lens[:-1]:
            starts.append(starts[-1] + n)
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(lens):
            by_len.setdefault(n, []).append(i)
        out = None if len(by_len) == 1 else torch.empty_like(q)
        for n, seqs in by_len.items():
            b, n_blocks = len(seqs), -(-n // self.block_size)
            index = torch.tensor(seqs, device=tables.device)
            keys, values = self._load(layer, tables.index_select(0, index)[:, :n_blocks])  # [KVH, b, L, D]
            keys = keys[:, :, :n].transpose(0, 1).to(q.dtype)  # [b, KVH, n, D]
            values = values[:, :, :n].transpose(0, 1).to(q.dtype)
            if out is None:  # one length: the step's rows are these sequences' rows, in order
                rows = None
                qb = q.view(b, n, h, d)
            else:
                rows = torch.cat([torch.arange(starts[i], starts[i] + n, device=q.device) for i in seqs])
                qb = q.index_select(0, rows).view(b, n, h, d)
            qh = qb.transpose(1, 2)  # [b, H, n, D]
            gqa = h != keys.shape[1]
            if window is None:  # as attend_one decides, so that one sequence gives its bits
                o = F.scaled_dot_product_attention(
                    qh, keys, values, is_causal=True, scale=self.scale, enable_gqa=gqa
                )
            else:
                mask = causal_mask(n, n, window, q.device)
                o = F.scaled_dot_product_attention(
                    qh, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=gqa
                )
            o = o.transpose(1, 2).reshape(b * n, h, d)  # [b n, H, D]
            if rows is None:
                return o
            out.index_copy_(0, rows, o)
        return out

    def _decode_mask(self, meta: AttnMetadata, max_blocks: int, device, window: int | None) -> torch.Tensor:
        lens = torch.tensor(meta.context_lens, device=device)
        return decode_mask(lens, max_blocks * self.block_size, window)
