"""Logits parity with HF transformers: tiny random models per architecture and RoPE scaling."""

from __future__ import annotations

import pytest
import torch

from slimlm.kv.contiguous import ContiguousKVCache
from slimlm.kv.metadata import AttnMetadata
from tests.tiny_models import ARCHS, cached_decode_logits, make_hf_model, slimlm_from_hf

pytest.importorskip("transformers")
SEQ = 28  # longer than the mistral window (12) and than llama3's original length (16)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_prefill_logits_match_transformers(arch):
    hf = make_hf_model(arch)
    model = slimlm_from_hf(hf)
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model.forward_dense(ids)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_decode_with_cache_matches_transformers(arch):
    hf = make_hf_model(arch)
    model = slimlm_from_hf(hf)
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    out, ref = cached_decode_logits(hf, model, ids, prompt=6)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()


def test_rope_scaling_changes_the_logits():
    """Guards the parity tests above: a scaling that silently did nothing would still 'match'."""
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(3))
    plain = slimlm_from_hf(make_hf_model("llama"))
    for arch in ("llama-linear", "llama-dynamic", "llama-llama3"):
        scaled = slimlm_from_hf(make_hf_model(arch))
        with torch.no_grad():
            diff = (scaled.forward_dense(ids) - plain.forward_dense(ids)).abs().max()
        assert diff > 5e-4, arch  # well above the 1e-4 parity tolerance


def test_mixed_batch_in_one_contiguous_step_equals_separate_runs():
    model = slimlm_from_hf(make_hf_model("qwen2"))
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 128, (9,), generator=gen), torch.randint(0, 128, (5,), generator=gen)
    with torch.no_grad():
        ref_a = model.forward_dense(a[None])[0, -1]
        ref_b = model.forward_dense(b[None])[0, -1]
        cache = ContiguousKVCache(model.config, 2, 16)
        meta = AttnMetadata(query_lens=[9, 5], context_lens=[9, 5], slots=[0, 1])
        positions = torch.cat([torch.arange(9), torch.arange(5)])
        hidden = model(torch.cat([a, b]), positions, cache, meta)
        logits = model.compute_logits(hidden[[8, 13]])
    assert torch.allclose(logits[0], ref_a, atol=1e-5)
    assert torch.allclose(logits[1], ref_b, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rmsnorm_is_bit_identical_to_hf_formula(dtype):
    from slimlm.models.llama import RMSNorm

    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576)
    norm = norm.to(dtype)
    x = (torch.randn(7, 576, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x32 = x.to(torch.float32)
    hf = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(norm(x), hf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_is_bit_identical_to_hf_rotate_half(dtype):
    from slimlm.models.rope import apply_rotary

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 12, 64, generator=gen).to(dtype)
    angles = torch.randn(5, 32, generator=gen)
    cos, sin = (
        torch.cat((angles, angles), -1).cos().to(dtype),
        torch.cat((angles, angles), -1).sin().to(dtype),
    )
    rotate_half = torch.cat((-x[..., 32:], x[..., :32]), dim=-1)
    hf = x * cos[:, None] + rotate_half * sin[:, None]
    signed_sin = torch.cat((-sin[:, :32], sin[:, 32:]), dim=-1)
    assert torch.equal(apply_rotary(x, cos, signed_sin), hf)
