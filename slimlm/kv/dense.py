"""Cache-less causal attention for full-sequence forwards (training, perplexity)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimlm.config import ModelConfig
from slimlm.kv.attention import attend_softcapped, causal_mask
from slimlm.kv.metadata import AttnMetadata


class DenseAttention:
    """Stores nothing: each sequence of the step attends causally to its own tokens only."""

    def __init__(self, config: ModelConfig) -> None:
        self.scale = config.attn_scale
        self.windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
        self.softcap = config.attn_logit_softcapping

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        b, s = meta.num_seqs, meta.query_lens[0]
        if any(q_len != s for q_len in meta.query_lens):
            raise ValueError("DenseAttention needs sequences of equal length")
        qh = q.view(b, s, *q.shape[1:]).transpose(1, 2)  # [B, H, S, D]
        kh = k.view(b, s, *k.shape[1:]).transpose(1, 2)  # [B, KVH, S, D]
        vh = v.view(b, s, *v.shape[1:]).transpose(1, 2)
        gqa = qh.shape[1] != kh.shape[1]
        window = self.windows[layer]
        if self.softcap:
            mask = causal_mask(s, s, window, q.device)
            out = attend_softcapped(qh, kh, vh, mask, self.scale, self.softcap)
        elif window is None or s <= window:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            mask = causal_mask(s, s, window, q.device)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(b * s, *q.shape[1:])  # [T, H, D]
