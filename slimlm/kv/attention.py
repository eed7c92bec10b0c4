"""Causal attention over a sequence's cached context (SDPA with GQA), shared by every cache layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(
    q_len: int, ctx_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Bool mask [q_len, ctx_len] (True = attend) for new tokens at the end of a context; None if full."""
    offset = ctx_len - q_len
    if q_len == 1 and (sliding_window is None or ctx_len <= sliding_window):
        return None
    rows = torch.arange(q_len, device=device)[:, None] + offset
    cols = torch.arange(ctx_len, device=device)[None, :]
    mask = cols <= rows
    if sliding_window is not None:
        mask &= cols > rows - sliding_window
    return mask


def attend_softcapped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, cap: float
) -> torch.Tensor:
    """Attention with scores -> cap * tanh(scores / cap) (Gemma's soft-capping), which SDPA cannot do.

    q [B, H, Q, D]; k, v [B, KVH, L, D]; mask broadcastable to [B, H, Q, L] (True = attend) or None.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / cap) * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [q_len, H, D]; k, v: [ctx_len, KVH, D] -> [q_len, H, D]."""
    q_len, ctx_len = q.shape[0], k.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
    kh = k.transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
    vh = v.transpose(0, 1).unsqueeze(0)
    gqa = qh.shape[1] != kh.shape[1]
    if softcap:
        mask = causal_mask(q_len, ctx_len, sliding_window, q.device)
        return attend_softcapped(qh, kh, vh, mask, scale, softcap).squeeze(0).transpose(0, 1)
    if q_len == ctx_len and sliding_window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = causal_mask(q_len, ctx_len, sliding_window, q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)  # [q_len, H, D]


def decode_mask(context_lens: torch.Tensor, max_len: int, sliding_window: int | None) -> torch.Tensor:
    """Bool mask [B, max_len] (True = attend) for one new token per sequence over padded contexts."""
    cols = torch.arange(max_len, device=context_lens.device)[None, :]
    mask = cols < context_lens[:, None]
    if sliding_window is not None:
        mask &= cols >= (context_lens[:, None] - sliding_window)
    return mask


def attend_decode_batch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """One new token per sequence. q: [B, H, D]; k, v: [KVH, B, L, D] padded, heads first; mask [B, L].

    Heads-first K/V is the paged pool's own layout, so the gathered blocks feed the matmuls without a
    transpose copy (that copy was ~8% of a 16-way decode step). `mask=None` means no padding at all.
    Batches of bf16/fp16 take two matmuls; float32, and a single sequence in any dtype, take float32
    SDPA: one row's bf16 matmuls cost more than upcasting its context (docs/measured_choices.md).
    """
    if softcap:
        kh, vh = k.transpose(0, 1), v.transpose(0, 1)  # [B, KVH, L, D]
        m = None if mask is None else mask[:, None, None, :]
        return attend_softcapped(q.unsqueeze(2), kh, vh, m, scale, softcap).squeeze(2)
    if q.dtype in (torch.bfloat16, torch.float16) and q.shape[0] > 1:
        return _attend_decode_matmul(q, k, v, mask, scale)
    qh = q.float().unsqueeze(2)  # [B, H, 1, D]
    kh, vh = k.transpose(0, 1).float(), v.transpose(0, 1).float()  # [B, KVH, L, D]
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=attn_mask, scale=scale, enable_gqa=qh.shape[1] != kh.shape[1]
    )
    return out.squeeze(2).to(q.dtype)


def _attend_decode_matmul(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One-token attention as two batched matmuls, softmax in float32.

    torch's CPU flash kernel is much slower than this for bf16 decode with a padding mask; in float32
    it is as fast as this, so fp32 keeps SDPA (figures: docs/measured_choices.md). Query heads of a KV group share one matmul.
    """
    b, h, d = q.shape
    kvh = k.shape[0]
    qg = q.view(b, kvh, h // kvh, d).transpose(0, 1)  # [KVH, B, G, D]: GQA without repeating K/V
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [KVH, B, G, L]
    if mask is not None:
        scores.masked_fill_(~mask[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(b, h, d)
