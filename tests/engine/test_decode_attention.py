"""The bf16/fp16 decode attention (two matmuls) against float32 SDPA on padded, GQA batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm.kv.attention import attend_decode_batch, decode_mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("lens", [[1, 7, 30, 48, 16], [30]])  # a batch, and one sequence (its own path)
def test_decode_attention_matches_float32_sdpa(dtype, window, lens):
    torch.manual_seed(0)
    b, h, kvh, d, length = len(lens), 9, 3, 64, 48
    q, k, v = torch.randn(b, h, d), torch.randn(b, kvh, length, d), torch.randn(b, kvh, length, d)
    lens = torch.tensor(lens)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 12])
def test_one_sequence_paged_decode_cuts_its_window_like_the_reference_cache(dtype, window):
    from dataclasses import replace

    from slimlm.kv.contiguous import ContiguousKVCache
    from slimlm.kv.metadata import AttnMetadata
    from slimlm.kv.paged import PagedKVCache
    from tests.tiny_models import make_hf_model, slimlm_from_hf

    config = replace(slimlm_from_hf(make_hf_model("mistral")).config, sliding_window=window)
    h, kvh, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    paged = PagedKVCache(config, num_blocks=10, block_size=4, dtype=dtype)
    paged.prepare_blocks(range(10))
    reference = ContiguousKVCache(config, 1, 40, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    for t in range(30):  # 30 one-token steps: past the window, across 8 blocks
        q, k, v = (
            torch.randn(1, h, d, generator=gen),
            torch.randn(1, kvh, d, generator=gen),
            torch.randn(1, kvh, d, generator=gen),
        )
        table = torch.tensor([list(range(t // 4 + 1))])
        meta = AttnMetadata(
            query_lens=[1], context_lens=[t + 1], block_tables=table, slot_mapping=torch.tensor([t])
        )
        got = paged.attend(0, q.to(dtype), k.to(dtype), v.to(dtype), meta).float()
        want = reference.attend(0, q, k, v, AttnMetadata.single(1, t + 1))
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
