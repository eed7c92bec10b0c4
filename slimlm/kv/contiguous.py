"""A contiguous KV cache: one preallocated [max_seqs, max_len] row per sequence. The reference layout."""

from __future__ import annotations

import torch

from slimlm.config import ModelConfig
from slimlm.kv.attention import attend_decode_batch, attend_one, decode_mask
from slimlm.kv.metadata import AttnMetadata


class ContiguousKVCache:
    """Each sequence owns row `meta.slots[i]`; simple and exact, used for single-sequence generation."""

    def __init__(
        self,
        config: ModelConfig,
        max_seqs: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.num_hidden_layers, max_seqs, max_len, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.sliding_window = config.sliding_window
        self.windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
        self.scale = config.attn_scale
        self.softcap = config.attn_logit_softcapping

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata
    ) -> torch.Tensor:
        slots = meta.slots or list(range(meta.num_seqs))
        kc, vc = self.k[layer], self.v[layer]
        start, window = 0, self.windows[layer]
        for slot, q_len, ctx in zip(slots, meta.query_lens, meta.context_lens, strict=True):
            if ctx > self.max_len:
                raise ValueError(f"context of {ctx} tokens exceeds the cache's {self.max_len}")
            kc[slot, ctx - q_len : ctx] = k[start : start + q_len]
            vc[slot, ctx - q_len : ctx] = v[start : start + q_len]
            start += q_len
        if meta.is_decode and meta.num_seqs > 1:
            max_ctx = max(meta.context_lens)
            idx = torch.tensor(slots, device=q.device)
            mask = meta.step_cache.get(f"contiguous_mask_{window}")
            if mask is None:
                lens = torch.tensor(meta.context_lens, device=q.device)
                mask = meta.step_cache[f"contiguous_mask_{window}"] = decode_mask(lens, max_ctx, window)
            keys = kc[idx, :max_ctx].permute(2, 0, 1, 3)  # [KVH, B, L, D]
            values = vc[idx, :max_ctx].permute(2, 0, 1, 3)
            return attend_decode_batch(q, keys, values, mask, self.scale, self.softcap)
        outs = []
        start = 0
        for slot, q_len, ctx in zip(slots, meta.query_lens, meta.context_lens, strict=True):
            outs.append(
                attend_one(
                    q[start : start + q_len], kc[slot, :ctx], vc[slot, :ctx], self.scale, window, self.softcap
                )
            )
            start += q_len
        return torch.cat(outs, dim=0)
