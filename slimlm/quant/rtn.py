"""Round-to-nearest group-wise quantization: the baseline, and the quantizer AWQ and GPTQ build on."""

from __future__ import annotations

import torch

from slimlm.quant.kernel_scales import rounded_group_scale, scale_bits_for
from slimlm.quant.scheme import QuantizedWeight, check_scheme, dequantize_codes


def group_qparams(
    w: torch.Tensor, bits: int, sym: bool, float_zero: bool = False, narrow: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for each row of `w` [..., n] (one group per row).

    Integer zeros: the range always contains 0 so that zero weights stay exact (the GPTQ convention).
    Symmetric: z = 2^(bits-1) and s = 2·absmax / (2^bits - 1); asymmetric: s = (max - min) / (2^bits - 1),
    z = round(-min / s). `float_zero` (asymmetric only): the grid spans exactly [min, max] and z = -min / s
    is a float (float32 zeros), i.e. w = s·q + min as llama.cpp's Q4_1 stores it; a group whose weights
    already lie on such a grid (a Q4_1 GGUF at its own group size) is reproduced exactly.
    `narrow` (symmetric only): s = absmax / (2^(bits-1) - 1) rounded to fp16, codes z ± (2^(bits-1) - 1):
    llama.cpp's Q8_0 block (d = fp16(absmax / 127)); a group of Q8_0 weights is then reproduced exactly,
    where the wide grid (s = 2·absmax / 255) moves every code off it.
    Integer-zero groups of 32/64/128 (symmetric, or 4-bit) are rounded so that d and m = -z·d are exact in fp16
    (kernel_scales.py: the C kernel then holds them at 2 bytes each); zeros and codes are taken on the
    rounded grid.
    """
    maxq = 2**bits - 1
    w = w.float()
    if narrow and sym:  # fp16 scales, as Q8_0 stores d (the kernel then keeps them at 2 bytes too)
        scale = (w.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)).to(torch.float16).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
    if float_zero and not sym:
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = (hi - lo) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, -lo / scale
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale is exact
    keep = scale_bits_for(bits, sym, w.shape[-1])
    if keep is not None:  # d and m = -z·d exact in fp16 (kernel_scales.py); zeros taken on that grid
        scale = rounded_group_scale(w, lo, scale, bits, sym, keep)
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero.to(torch.int32)


def quantize_to_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """uint8 codes [out, in] of `w` under the given group-wise scales [out, groups] and zeros."""
    out, n_in = w.shape
    grouped = w.float().view(out, n_in // group_size, group_size)  # [out, groups, gs]
    q = torch.round(grouped / scales.unsqueeze(-1) + zeros.unsqueeze(-1))  # = round(w/s) + z for integer z
    return q.clamp(0, 2**bits - 1).to(torch.uint8).view(out, n_in)


def rtn_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    float_zero: bool = False,
    importance: torch.Tensor | None = None,
    narrow: bool = False,
) -> QuantizedWeight:
    """Quantize `weight` [out, in] group-wise by rounding to the nearest grid point.

    `importance` [in] (search.importance_for): each group's grid is searched to minimise the weighted
    rounding error instead of spanning the group's min/max (search.py).
    """
    out, n_in = weight.shape
    group_size = check_scheme(bits, group_size, n_in)
    if importance is None or narrow:  # narrow: the Q8_0 grid itself (absmax / 127), never searched
        grouped = weight.view(out, n_in // group_size, group_size)
        scales, zeros = group_qparams(grouped, bits, sym, float_zero, narrow)
    else:
        from slimlm.quant.search import searched_qparams  # search.py builds on group_qparams above

        scales, zeros = searched_qparams(weight, importance, bits, group_size, sym, float_zero and not sym)
    codes = quantize_to_codes(weight, scales, zeros, bits, group_size)
    if narrow and sym:
        scales = scales.to(torch.float16)  # exact (see group_qparams): stored at 2 bytes
    return QuantizedWeight(codes, scales, zeros, bits, group_size)


def fake_quantize(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = False, float_zero: bool = False
) -> torch.Tensor:
    """Quantize then dequantize (float32, same shape): what the quantized layer will compute with."""
    q = rtn_quantize(weight, bits, group_size, sym, float_zero)
    return dequantize_codes(q.codes, q.scales, q.zeros, q.group_size)
