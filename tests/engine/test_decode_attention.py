"""The bf16/fp16 decode attention (two matmuls) against float32 SDPA on padded, GQA batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm.kv.attention import attend_decode_batch, decode_mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window", [None, 20])
def test_decode_attention_matches_float32_sdpa(dtype, window):
    torch.manual_seed(0)
    b, h, kvh, d, length = 5, 9, 3, 64, 48
    q, k, v = torch.randn(b, h, d), torch.randn(b, kvh, length, d), torch.randn(b, kvh, length, d)
    lens = torch.tensor([1, 7, 30, 48, 16])
    mask = decode_mask(lens, length, window)
    scale = d**-0.5
    kh, vh = (
        x.transpose(0, 1).contiguous().to(dtype) for x in (k, v)
    )  # heads first, as the pool stores them
    got = attend_decode_batch(q.to(dtype), kh, vh, mask, scale).float()
    # Reference: each sequence alone, only its real (unpadded, in-window) context, float32.
    for i, n in enumerate(lens.tolist()):
        lo = 0 if window is None else max(0, n - window)
        ref = F.scaled_dot_product_attention(
            q[i, :, None], k[i, :, lo:n], v[i, :, lo:n], scale=scale, enable_gqa=True
        )[:, 0]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[i], ref, atol=tol, rtol=tol)
