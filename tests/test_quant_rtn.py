"""Scheme validation, nibble packing and round-to-nearest error bounds."""

from __future__ import annotations

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.quant.rtn import fake_quantize, rtn_quantize
from slimlm.quant.scheme import check_scheme, pack_nibbles, perm_from_g_idx, unpack_nibbles


def test_nibble_packing_round_trips_and_puts_even_columns_low():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(codes[0, 0]) + 16 * int(codes[0, 1])
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_is_at_most_half_a_step(bits, group_size, sym):
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.rand(16, 1)  # rows of different magnitude
    q = rtn_quantize(w, bits, group_size, sym)
    gs = 256 if group_size == -1 else group_size
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scales.shape == (16, 256 // gs)
    step = q.scales.repeat_interleave(gs, dim=1)
    err = (q.dequantize() - w).abs()
    # Symmetric grids have one code more on the negative side; the positive max may clamp by half a step.
    # A scale rounded down onto fp16-exact d and m (7 significant bits at 4 bits, 11 symmetric:
    # quant/kernel_scales.py) leaves the extremes up to (2^bits - 1) · 2^-keep more.
    keep = (11 if sym else 11 - bits) if group_size != -1 else 24  # per channel: not rounded
    assert bool((err <= step * (0.5 + (2**bits - 1) * 2.0**-keep) * (1 + 1e-5) + 1e-7).all())
    if sym:
        assert bool((q.zeros == 2 ** (bits - 1)).all())
    # Each group's 2^bits - 1 steps span its range around its extremes (it includes zero), with the scale
    # rounded onto fp16-exact d and m = -z·d (7 significant bits at 4 bits: quant/kernel_scales.py)
    grouped = w.view(16, -1, gs)
    span = grouped.amax(-1).clamp(min=0) - grouped.amin(-1).clamp(max=0)
    if not sym:
        covered = q.scales * (2**bits - 1)
        assert bool((covered >= span * (1 - 2.0**-6)).all()) and bool((covered <= span * (1 + 2.0**-6)).all())
    d, m = q.scales.float(), -q.zeros.float() * q.scales.float()
    if (bits == 4 or sym) and group_size != -1:  # the C kernel then holds them at 2 bytes per value
        assert torch.equal(d.half().float(), d) and torch.equal(m.half().float(), m)


def test_rtn_keeps_zero_groups_and_zero_weights_exact():
    w = torch.zeros(16, 64)
    w[:, 40] = 1.0
    q = rtn_quantize(w, 4, 32)
    assert torch.equal(q.dequantize()[:, :32], torch.zeros(16, 32))
    assert torch.equal(q.dequantize()[:, 32:40], torch.zeros(16, 8))
    # the group maximum lies within a step (the step is rounded to fp16-exact: kernel_scales.py)
    assert float((q.dequantize() - w).abs().max()) <= float(q.scales[0, 1])


def test_fake_quantize_is_idempotent():
    torch.manual_seed(1)
    w = torch.randn(8, 128)
    # float-zero grids (not rounded) find themselves again
    once = fake_quantize(w, 4, 64, float_zero=True)
    torch.testing.assert_close(fake_quantize(once, 4, 64, float_zero=True), once)
    # integer zero points: the scale is rounded to 7 significant bits (kernel_scales.py), so a group's
    # extremes can land one code inside and the second pass fits a slightly different grid; the weights
    # then move by less than one step of the first grid
    once = fake_quantize(w, 4, 64)
    step = (once.view(8, 2, 64).amax(-1) - once.view(8, 2, 64).amin(-1)) / 14
    moved = (fake_quantize(once, 4, 64) - once).abs().view(8, 2, 64).amax(-1)
    assert bool((moved <= step).all())


@pytest.mark.parametrize(
    "bits,group_size,in_features,message",
    [
        (3, 64, 128, "unsupported bits 3"),
        (2, 64, 128, "unsupported bits 2"),
        (4, 48, 96, "unsupported group size 48"),
        (4, 0, 128, "unsupported group size 0"),
        (4, 128, 576, "does not divide the 576 input features"),
        (8, 64, 96, "does not divide the 96 input features"),
    ],
)
def test_bad_schemes_raise(bits, group_size, in_features, message):
    with pytest.raises(SlimlmError, match=message):
        check_scheme(bits, group_size, in_features)
    with pytest.raises(SlimlmError):
        rtn_quantize(torch.randn(4, in_features), bits, group_size)


def test_perm_from_g_idx():
    assert perm_from_g_idx(torch.arange(64) // 32, 32) is None  # trivial order
    order = torch.randperm(64)
    g_idx = torch.empty(64, dtype=torch.int32)
    g_idx[order] = (torch.arange(64) // 16).to(torch.int32)  # act-order: group of column order[j] is j // 16
    perm = perm_from_g_idx(g_idx, 16)
    assert torch.equal(g_idx[perm].long(), torch.arange(64) // 16)
    with pytest.raises(SlimlmError, match="g_idx"):
        perm_from_g_idx(torch.zeros(64, dtype=torch.int32), 16)
