"""The model runner: the only place that turns scheduled sequences into tensors and runs the model."""

from __future__ import annotations

import contextlib

import torch

from slimlm.kv.metadata import AttnMetadata
from slimlm.models.prepack import onednn_disabled


class ModelRunner:
    """Builds the flat batch for a step, runs the model over the paged cache, returns last-token logits."""

    def __init__(self, model, cache, block_size: int, device: torch.device | str, fused=None) -> None:
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.device = torch.device(device)
        self.fused = (
            fused  # a FusedDecoder (slimlm.kernels.fused_decode) where slimlm.engine.backend chose one
        )

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, seqs: list, is_prefill: bool) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        for seq in seqs:
            total = seq.num_tokens
            start = seq.num_cached_tokens if is_prefill else total - 1
            input_ids.extend(seq.token_ids[start:total])
            positions.extend(range(start, total))
            slots.extend(self._slots(seq.block_table, start, total))
            query_lens.append(total - start)
            context_lens.append(total)
        max_blocks = max(len(seq.block_table) for seq in seqs)
        padded = any(len(seq.block_table) < max_blocks for seq in seqs)
        # -1 padding is read as block 0 in decode, so block 0 must hold finite values too.
        self.cache.prepare_blocks([b for seq in seqs for b in seq.block_table] + ([0] if padded else []))
        tables = [seq.block_table + [-1] * (max_blocks - len(seq.block_table)) for seq in seqs]
        dev = self.device
        meta = AttnMetadata(
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, meta

    def _run_fused(self, seqs: list) -> torch.Tensor:
        """A decode step on the C kernel (slimlm.kernels.fused_decode)."""
        # Fresh blocks are zeroed as on the PyTorch path, which reads whole blocks under a mask.
        self.cache.prepare_blocks([b for seq in seqs for b in seq.block_table])
        return self.fused.decode(
            [seq.token_ids[-1] for seq in seqs],
            [seq.num_tokens - 1 for seq in seqs],
            [seq.block_table for seq in seqs],
        )

    @torch.inference_mode()
    def run(self, seqs: list, is_prefill: bool) -> torch.Tensor:
        """-> float32 logits [num_seqs, vocab] for the last token of each sequence."""
        if self.fused is not None and not is_prefill and len(seqs) <= self.fused.max_batch:
            return self._run_fused(seqs)
        ids, pos, meta = self.prepare(seqs, is_prefill)
        # One-row matmuls read every weight for a single row: torch's GEMV streams plain weights ~1.6x
        # faster than oneDNN there (slimlm.models.prepack); packed weights keep using oneDNN regardless.
        # A single sequence's decode step is one row throughout; its logits are one row after a prefill too.
        one_seq = self.device.type == "cpu" and len(seqs) == 1
        with onednn_disabled() if one_seq and not is_prefill else contextlib.nullcontext():
            hidden = self.model(ids, pos, self.cache, meta)
        last = torch.cumsum(torch.tensor(meta.query_lens, device=self.device), 0) - 1
        with onednn_disabled() if one_seq else contextlib.nullcontext():
            return self.model.compute_logits(hidden[last])
