"""Quantizers write grids the C kernel holds at 2 bytes per scale (issue 15, w8 pass): d and m = -z·d of
every group exact in fp16, the codes taken on the rounded grid, and the rounding costs next to nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from slimlm.kernels.qweights import dequantize, from_quantized, pack
from slimlm.plan.kernel_weights import kernel_linear_bytes, kernel_scale_bytes
from slimlm.quant.format import save_quantized
from slimlm.quant.gptq import gptq_quantize
from slimlm.quant.kernel_scales import is_fp16_exact
from slimlm.quant.quantize import quantize_model
from slimlm.quant.rtn import rtn_quantize
from tests.tiny_models import make_hf_model

SCHEMES = [(8, 64, True), (8, 32, True), (8, 128, True), (4, 64, False), (4, 32, False), (4, 64, True)]


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) * (torch.rand(48, 1, generator=g) * 0.05 + 1e-3)
    w[0] = 0  # an all-zero row
    w[1, :64] *= 1e-5  # a group of tiny weights: its scale is a fp16 subnormal
    return w


def _quantize(method: str, w: torch.Tensor, bits: int, group: int, sym: bool):
    g = torch.Generator().manual_seed(1)
    if method == "rtn":
        return rtn_quantize(w, bits, group, sym)
    if method == "imatrix":
        return rtn_quantize(w, bits, group, sym, importance=torch.rand(w.shape[1], generator=g) + 0.1)
    x = torch.randn(512, w.shape[1], generator=g)
    return gptq_quantize(w, 2 * x.T @ x / 512, bits, group, sym)


@pytest.mark.parametrize("method", ["rtn", "imatrix", "gptq"])
@pytest.mark.parametrize("bits,group,sym", SCHEMES)
def test_written_grids_are_fp16_exact_and_the_kernel_holds_them_at_two_bytes(method, bits, group, sym):
    q = _quantize(method, _weight(), bits, group, sym)
    d = q.scales.float()
    m = -q.zeros.float() * d
    assert is_fp16_exact(d) and is_fp16_exact(m)
    kw = from_quantized(q)
    assert kw.scale_bits == 16
    # the kernel layout holds the quantizer's weights exactly (one rounding of the same product each way)
    assert torch.equal(dequantize(kw), q.dequantize())
    # and its bytes are what the planner counts for a checkpoint with fp16 scales
    scale_bytes = kernel_scale_bytes(bits, group == -1, sym, fp16_scales=True)
    assert kw.nbytes == kernel_linear_bytes(48, 256, bits, group, scale_bytes)


@pytest.mark.parametrize("bits,group,sym", [(8, 64, True), (4, 64, False), (4, 32, False)])
def test_rounding_the_grid_costs_next_to_nothing(bits, group, sym):
    """Against the classic min/max grid with float32 scales (computed here), the rounded grid's RMS error
    grows by at most what its step's rounding allows (< 2^-10 relative at 8 bits, < 2^-6 at 4); each
    group takes the better of its two neighbours, so on the whole it is no worse here."""
    w = _weight(3)[2:]
    q = rtn_quantize(w, bits, group, sym)
    grouped = w.view(w.shape[0], -1, group)
    maxq = 2**bits - 1
    lo, hi = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    s = ((hi - lo) / maxq).unsqueeze(-1)
    z = (2 ** (bits - 1)) if sym else torch.round(-lo.unsqueeze(-1) / s)
    ref = (torch.clamp(torch.round(grouped / s + z), 0, maxq) - z) * s
    err_ref = (ref.view_as(w) - w).pow(2).mean().sqrt()
    err = (q.dequantize() - w).pow(2).mean().sqrt()
    assert float(err) <= float(err_ref) * (1 + (2.0**-10 if bits == 8 else 2.0**-6))


def test_per_channel_grids_are_left_as_they_were():
    """A grid spanning the whole row keeps the min/max scale (PyTorch's int8 module stores it as bf16,
    fp16-exact anyway); only groups of 32/64/128 are rounded."""
    w = _weight(5)
    q = rtn_quantize(w, 8, -1, sym=True)
    torch.testing.assert_close(q.scales.squeeze(-1)[1:], w[1:].abs().amax(-1) * 2 / 255, rtol=1e-6, atol=0)
    assert not is_fp16_exact(q.scales[2:])


def test_older_float32_grids_still_pack_and_are_planned_at_four_bytes():
    """Checkpoints written before the rounding keep float32 (d, m) in the kernel, and the planner (no
    `fp16_scales` in their config) counts 4 bytes for each."""
    q = rtn_quantize(_weight(), 8, 64, True)
    q.scales = q.scales * (1 + 2.0**-20)  # an old RTN scale: float32, not on fp16's grid
    kw = from_quantized(q)
    assert kw.scale_bits == 32
    assert kw.nbytes == kernel_linear_bytes(
        48, 256, 8, 64, kernel_scale_bytes(8, False, True, fp16_scales=False)
    )
    torch.testing.assert_close(dequantize(kw), q.dequantize(), rtol=2e-6, atol=1e-9)  # float32 roundings
    # fp16-exact values from any source are held at 2 bytes (pack decides on the values)
    codes, d = q.codes, q.scales.half().float()
    assert pack(codes, d, -128 * d, 8, 64).scale_bits == 16


@pytest.mark.parametrize(
    "bits,kwargs,fp16",
    [(8, {}, True), (4, {}, True), (4, {"float_zero": True}, False), (4, {"embedding_bits": 8}, True)],
)
def test_checkpoints_say_when_their_scales_are_fp16_exact(tmp_path, bits, kwargs, fp16):
    model = make_hf_model("llama")
    config = quantize_model(model, "rtn", bits, 32, progress=False, **kwargs)
    assert bool(config.get("fp16_scales")) is fp16
    save_quantized(model, config, tmp_path / "out")
    state = load_file(tmp_path / "out" / "model.safetensors")
    for name, scales in state.items():
        if not name.endswith(".scales"):
            continue
        zeros = state[name.removesuffix(".scales") + ".zeros"].float()
        d = scales.float()
        exact = is_fp16_exact(d) and is_fp16_exact(-zeros * d)
        assert exact or not fp16, name  # what the config promises holds for every tensor written


@pytest.mark.parametrize("bits,sym,group", [(4, False, 64), (8, True, 32), (4, False, 128)])
def test_the_scale_search_in_chunks_chooses_what_the_whole_tensor_would(monkeypatch, bits, sym, group):
    """rounded_group_scale runs a chunk of groups at a time (speed); each group's choice is its own, so the
    chunked result equals the whole-tensor one bit for bit, across chunk edges and a short last chunk."""
    from slimlm.quant import kernel_scales

    torch.manual_seed(0)
    w = torch.randn(37, 11, group) * 0.02  # [rows, groups, group]: 407 groups, chunks of 5 groups below
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / (2**bits - 1)
    keep = kernel_scales.scale_bits_for(bits, sym, group)
    monkeypatch.setattr(kernel_scales, "SCALE_CHUNK_ELEMENTS", 2**40)
    whole = kernel_scales.rounded_group_scale(w, lo, scale, bits, sym, keep)
    monkeypatch.setattr(kernel_scales, "SCALE_CHUNK_ELEMENTS", 5 * group)
    chunked = kernel_scales.rounded_group_scale(w, lo, scale, bits, sym, keep)
    assert chunked.shape == scale.shape and torch.equal(chunked, whole)
    # and the choice is a real one: some groups round down, some up
    up = kernel_scales.round_significant(scale, keep, "up")
    assert 0 < int((whole != up).sum()) < whole.numel()
