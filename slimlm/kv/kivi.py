"""int4 KV with keys quantized per channel within a block (KIVI) and the newest tokens kept in bf16.

KIVI (Liu et al., 2024) observed that key outliers sit in fixed channels, so a scale per channel
(over the block's tokens) fits keys far better than a scale per token; values stay per token. A
channel's range is only known once its block is full, so a block's tokens wait in a bf16 staging slot
until the block fills; then the block is quantized and its slot freed. K and V are turned by the
pool's rotation first, as in every quantized pool here.

Attention sinks (StreamingLLM, IntactKV, KVQuant): attention mass piles up on a sequence's first tokens
(BOS, the system prompt), and their keys and values are the largest, so the blocks that hold the first
`format.sink_tokens` tokens are never quantized: they keep their staging slot for as long as the block
lives (a fixed cost per sequence, not per token). A cached sink block nobody references keeps its slot
too; when the slots run out, the pool asks the block manager to forget such a block (`forget_cached`)
and takes its slot.

What a token reads is set by positions only: a query at position t reads the sink blocks and its own
block, up to t, exactly (bf16), and every other block before its own as quantized codes. Prefill, chunked prefill, decode,
prefix-cache hits and preemption all give a token the same inputs (tests/test_kv_kivi.py).

Storage per layer: key codes [blocks, block_size, KVH, D/2] with fp16 scales and uint8 zero points
[blocks, KVH, D] per channel; value codes per token as in the int4 pool, one scale and zero per token
and head; staging K and V, bf16 [slots, block_size, KVH, D]; and `stage_of` [blocks] (int32, -1 when
the block has no slot), shared by all layers. A pool gets `staging_slots` slots (the engine passes
KVFormat.staging_slots: (2 + sink blocks) x max_num_seqs + 1: a sequence holds its sink blocks and at
most one partial block between steps, and one step may start a new one while the previous is being
finished).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimlm.config import ModelConfig
from slimlm.errors import SlimlmError
from slimlm.formats.kv import KV_FORMATS
from slimlm.kv.metadata import AttnMetadata
from slimlm.kv.paged import gather_blocks
from slimlm.kv.quant_ops import SCALE_DTYPE, ZERO_DTYPE, dequantize, pack_int4, quantize, unpack_int4
from slimlm.kv.quantized import QUANTIZED_CACHES, QuantizedPagedKVCache

STAGE_DTYPE = torch.bfloat16


def quantize_channels(x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., bs, KVH, D] (one block) -> codes [..., bs, KVH, D * bits / 8], scale and zero [..., KVH, D]:
    per channel over the block's tokens, the same asymmetric rule as `quant_ops.quantize`."""
    levels = 2**bits - 1
    xf = x.float()
    lo = xf.amin(dim=-3).clamp(max=0)
    hi = xf.amax(dim=-3).clamp(min=0)
    scale = ((hi - lo) / levels).clamp(2.0**-24, torch.finfo(torch.float16).max).to(SCALE_DTYPE)
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, levels)
    codes = torch.round(xf / s.unsqueeze(-3) + zero.unsqueeze(-3)).clamp(0, levels).to(torch.uint8)
    if bits == 4:
        codes = pack_int4(codes)
    return codes, scale, zero.to(ZERO_DTYPE)


def dequantize_channels(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype) -> torch.Tensor:
    """codes [..., bs, KVH, D/2], scale/zero [..., KVH, D] -> [..., bs, KVH, D]."""
    centered = unpack_int4(codes).to(dtype) - zero.to(dtype).unsqueeze(-3)
    return centered * scale.to(dtype).unsqueeze(-3)


class Int4KiviPagedKVCache(QuantizedPagedKVCache):
    """The int4 pool: KIVI keys, per-token values, bf16 staging of each unfinished block."""

    format = KV_FORMATS["int4"]

    def __init__(self, *args, staging_slots: int | None = None, **kwargs) -> None:
        self._slots_wanted = staging_slots
        # the block manager's forget_cached (set by the engine): frees a cached sink block's slot
        self.forget_cached = None
        super().__init__(*args, **kwargs)
        self.sink_blocks = self.format.sink_blocks(self.block_size)

    def _allocate(self, num_layers: int, device) -> None:
        super()._allocate(num_layers, device)
        blocks, bs, h, d = self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        # keys: a scale and zero per channel per block, not per token
        self.k_scale = torch.zeros((num_layers, blocks, h, d), dtype=SCALE_DTYPE, device=device)
        self.k_zero = torch.zeros((num_layers, blocks, h, d), dtype=ZERO_DTYPE, device=device)
        slots = self._slots_wanted if self._slots_wanted is not None else min(blocks, 16)
        # empty: a staged position is always written before anything reads it, so pages of slots
        # never used are never committed
        self.stage_k = torch.empty((num_layers, slots, bs, h, d), dtype=STAGE_DTYPE, device=device)
        self.stage_v = torch.empty((num_layers, slots, bs, h, d), dtype=STAGE_DTYPE, device=device)
        self.stage_of = torch.full((blocks,), -1, dtype=torch.int32, device=device)
        self.num_layers = num_layers

    # ---- staging slots ----
    def _take_slot(self, block: int) -> int:
        slot = int(self.stage_of[block])
        if slot >= 0:
            return slot
        used = set(self.stage_of[self.stage_of >= 0].tolist())
        free = next((s for s in range(self.stage_k.shape[1]) if s not in used), None)
        if free is None and self.forget_cached is not None:  # a cached sink block nobody uses gives way
            for other in torch.nonzero(self.stage_of >= 0).flatten().tolist():
                if other != block and self.forget_cached(other):
                    free, self.stage_of[other] = int(self.stage_of[other]), -1
                    break
        if free is None:
            raise SlimlmError(
                f"the int4 KV pool's {self.stage_k.shape[1]} staging slots (one per unfinished block) are "
                "(sink blocks and unfinished blocks) are all in use; lower the number of concurrent sequences"
            )
        self.stage_of[block] = free
        return free

    def release_block(self, block: int) -> None:
        """The block manager freed this block: its staging slot (if any) is free again."""
        self.stage_of[block] = -1

    def prepare_decode(self, positions: list[int], tables: list[list[int]]) -> None:
        """Before a C-kernel decode step: every token's block has a staging slot."""
        bs = self.block_size
        for pos, table in zip(positions, tables, strict=True):
            self._take_slot(table[pos // bs])

    def finish_decode(self, positions: list[int], tables: list[list[int]]) -> None:
        """After a C-kernel decode step: blocks the step filled were quantized (all but sink blocks);
        free their slots."""
        bs = self.block_size
        for pos, table in zip(positions, tables, strict=True):
            if pos % bs == bs - 1 and pos // bs >= self.sink_blocks:
                self.stage_of[table[pos // bs]] = -1

    # ---- the PyTorch path ----
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        rot = self.rotation
        q, k, v = (q.float() @ rot).to(q.dtype), k.float() @ rot, v.float() @ rot
        out, start = [], 0
        tables = meta.block_tables
        for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens, strict=True)):
            table = tables[i].tolist()
            exact_k, exact_v, lo = self._write(
                layer, table, ctx - q_len, ctx, k[start : start + q_len], v[start : start + q_len]
            )
            out.append(self._attend_seq(layer, q[start : start + q_len], table, ctx, lo, exact_k, exact_v))
            start += q_len
        if layer == self.num_layers - 1:
            self._free_filled(meta)
        return (torch.cat(out).float() @ rot.T).to(q.dtype)

    def _write(self, layer: int, table: list[int], start: int, end: int, k: torch.Tensor, v: torch.Tensor):
        """Stores positions [start, end) of one sequence; -> the exact (bf16) K, V of its blocks from the
        first one this step touches, [n, KVH, D] from position `lo` (that block's start), and `lo`."""
        bs = self.block_size
        lo = start // bs * bs
        ek = torch.cat((self._staged(layer, table[start // bs], start - lo, "k"), k.to(STAGE_DTYPE)))
        ev = torch.cat((self._staged(layer, table[start // bs], start - lo, "v"), v.to(STAGE_DTYPE)))
        full_end = end // bs * bs
        for b0 in range(lo, full_end, bs):  # blocks complete after this step: quantize them
            block = table[b0 // bs]
            if b0 // bs < self.sink_blocks:  # an attention sink: stays in its staging slot
                slot = self._take_slot(block)
                self.stage_k[layer, slot] = ek[b0 - lo : b0 - lo + bs]
                self.stage_v[layer, slot] = ev[b0 - lo : b0 - lo + bs]
                continue
            kc, ks, kz = quantize_channels(ek[b0 - lo : b0 - lo + bs])
            vc, vs, vz = quantize(ev[b0 - lo : b0 - lo + bs], 4, self.v_group)
            self.k_codes[layer, block], self.k_scale[layer, block], self.k_zero[layer, block] = kc, ks, kz
            self.v_codes[layer, block] = vc
            self.v_scale[layer, block] = vs.view(self.v_scale.shape[2:])
            self.v_zero[layer, block] = vz.view(self.v_zero.shape[2:])
        if end > full_end:  # the unfinished block waits in its staging slot
            slot = self._take_slot(table[full_end // bs])
            self.stage_k[layer, slot, : end - full_end] = ek[full_end - lo :]
            self.stage_v[layer, slot, : end - full_end] = ev[full_end - lo :]
        return ek, ev, lo

    def _staged(self, layer: int, block: int, n: int, which: str) -> torch.Tensor:
        """The first n staged tokens of `block` (those written before this step)."""
        stage = self.stage_k if which == "k" else self.stage_v
        if n == 0:
            return stage.new_empty((0, *stage.shape[3:]))
        slot = int(self.stage_of[block])
        if slot < 0:
            raise RuntimeError(f"block {block} holds {n} unfinished tokens but no staging slot")
        return stage[layer, slot, :n]

    def _free_filled(self, meta: AttnMetadata) -> None:
        """After the last layer: blocks this step completed give their slot back (if they held one: staged
        before, or a stale slot of a reused cached block), except sink blocks."""
        bs = self.block_size
        for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens, strict=True)):
            for b in range(max((ctx - q_len) // bs, self.sink_blocks), ctx // bs):
                self.stage_of[int(meta.block_tables[i, b])] = -1

    def _attend_seq(self, layer, q, table, ctx, lo, exact_k, exact_v) -> torch.Tensor:
        """q [T, H, D] at positions ctx - T .. ctx - 1: blocks before a query's own read quantized (sink
        blocks exact), its own block exact. Keys are [as read 0..lo) + [exact lo..ctx), with a per-query
        mask."""
        bs, dtype = self.block_size, q.dtype
        t = q.shape[0]
        n_before = lo // bs
        parts_k, parts_v = [], []
        if n_before:
            self._read_blocks(layer, table, 0, n_before, parts_k, parts_v)
        # quantized copies of the blocks this step completed (read by later queries of the step)
        full_end = ctx // bs * bs
        if full_end > lo:
            self._read_blocks(layer, table, lo // bs, full_end // bs, parts_k, parts_v)
        quant_len = max(full_end, lo)
        keys = torch.cat([*parts_k, exact_k.to(dtype)]) if parts_k else exact_k.to(dtype)
        values = torch.cat([*parts_v, exact_v.to(dtype)]) if parts_v else exact_v.to(dtype)
        qpos = torch.arange(ctx - t, ctx, device=q.device)[:, None]
        own = qpos // bs * bs  # first position of each query's own block
        kq = torch.arange(quant_len, device=q.device)[None, :]
        ke = torch.arange(lo, ctx, device=q.device)[None, :]
        mask = torch.cat(((kq < own).expand(t, -1), (ke >= own) & (ke <= qpos)), dim=1)
        window = self.windows[layer]  # per layer: Gemma 3's global layers have none
        if window is not None:
            mask &= torch.cat(((kq > qpos - window).expand(t, -1), ke > qpos - window), dim=1)
        qh, kh, vh = q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, scale=self.scale, enable_gqa=qh.shape[1] != kh.shape[1]
        )
        return out[0].transpose(0, 1)  # [T, H, D]

    def _read_blocks(self, layer: int, table: list[int], first: int, end: int, parts_k, parts_v) -> None:
        """Appends K and V of the sequence's blocks first..end-1 as read: sink blocks from their staging
        slot, the others dequantized."""
        sink_end = min(max(first, self.sink_blocks), end)
        if sink_end > first:
            slots = self.stage_of[torch.tensor(table[first:sink_end])].long()
            parts_k.append(self.stage_k[layer, slots].flatten(0, 1).to(self.compute_dtype))
            parts_v.append(self.stage_v[layer, slots].flatten(0, 1).to(self.compute_dtype))
        if end > sink_end:
            blocks = torch.tensor(table[sink_end:end], device=self.k_codes.device)
            parts_k.append(self._read_keys(layer, blocks))
            parts_v.append(self._read_values(layer, blocks))

    def _read_keys(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        codes = gather_blocks(self.k_codes[layer], blocks)  # [n, bs, KVH, D/2]
        scale = gather_blocks(self.k_scale[layer], blocks)  # [n, KVH, D]
        zero = gather_blocks(self.k_zero[layer], blocks)
        return dequantize_channels(codes, scale, zero, self.compute_dtype).flatten(0, 1)  # [n * bs, KVH, D]

    def _read_values(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = (
            gather_blocks(t[layer], blocks) for t in (self.v_codes, self.v_scale, self.v_zero)
        )
        return dequantize(codes, scale, zero, 4, self.compute_dtype).flatten(0, 1)

    @classmethod
    def bytes_per_block(cls, config: ModelConfig, block_size: int, dtype: torch.dtype | None = None) -> int:
        """Exact bytes of one block over all layers (codes, per-channel key scales, per-token value
        scales) plus its 4-byte staging index; the staging slots themselves are `staging_bytes`."""
        return cls.format.block_bytes(config, block_size)

    @staticmethod
    def staging_bytes(config: ModelConfig, block_size: int, slots: int) -> int:
        elem = torch.empty((), dtype=STAGE_DTYPE).element_size()
        per_slot = 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim
        return slots * per_slot * elem

    @property
    def nbytes(self) -> int:
        """Every block's bytes (the staging index included) and the staging slots."""
        extra = (self.stage_k, self.stage_v, self.stage_of)
        return super().nbytes + sum(t.numel() * t.element_size() for t in extra)


QUANTIZED_CACHES["int4"] = Int4KiviPagedKVCache
