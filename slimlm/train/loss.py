"""The training forward as one module (so DDP / FSDP wrap it): token ids and labels -> summed loss.

Logits are computed only for positions that have a label (assistant tokens of a chat), in chunks of
`chunk_tokens` that are recomputed in the backward, so the [tokens, vocab] float32 logits of a whole
batch never exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slimlm.kv.dense import DenseAttention
from slimlm.kv.metadata import AttnMetadata
from slimlm.train.data import IGNORE_INDEX


def forward_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, S, hidden] of a causal forward without a cache (as `forward_dense`)."""
    b, s = input_ids.shape
    meta = AttnMetadata(query_lens=[s] * b, context_lens=[s] * b)
    positions = torch.arange(s, device=input_ids.device).repeat(b)
    hidden = model(input_ids.reshape(-1), positions, DenseAttention(model.config), meta)  # [B*S, hidden]
    return hidden.view(b, s, -1)


class CausalLMLoss(nn.Module):
    """forward(input_ids [B, S], labels [B, S]) -> (sum of token cross-entropies, number of loss tokens)."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = forward_hidden(self.model, input_ids)
        targets = labels[:, 1:]  # position t predicts token t + 1
        mask = targets != IGNORE_INDEX
        picked = hidden[:, :-1][mask]  # [N, hidden]
        wanted = targets[mask]  # [N]
        # Zero, but part of the graph, so a batch without loss tokens still gives (zero) gradients.
        total = hidden.sum().float() * 0.0
        chunks = range(0, picked.shape[0], self.chunk_tokens)
        for start in chunks:
            h, t = picked[start : start + self.chunk_tokens], wanted[start : start + self.chunk_tokens]
            if len(chunks) > 1 and torch.is_grad_enabled():
                total = total + checkpoint(self._chunk_loss, h, t, use_reentrant=False)
            else:
                total = total + self._chunk_loss(h, t)
        return total, mask.sum()

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model.compute_logits(hidden)  # [n, vocab] float32
        return F.cross_entropy(logits.float(), targets, reduction="sum")


__all__ = ["CausalLMLoss", "forward_hidden"]
