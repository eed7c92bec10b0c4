"""The C kernel's quantized weight format (kernels/gemm_q.h): packing, unpacking, and the two sources.

A weight [rows, k] is codes (4 or 8 bits) with a scale d and a float minimum m per (row, group), so
w = d * code + m. That holds every format slimlm meets without requantizing:
- slimlm / AutoAWQ / GPTQ integer zero points z (slimlm/quant/scheme.py): m = -z * d;
- GGUF Q4_1 (d, m per 32): as is; Q4_0: m = -8 d; Q8_0 (signed q): code = q + 128, m = -128 d.
Scales are stored as fp16 where d and m survive the round trip exactly (GGUF's are fp16 already, and
`slimlm quantize` rounds its integer-zero grids onto fp16: quant/kernel_scales.py), else float32. Codes are tiled by 16 rows (see gemm_q.h), rows padded to a multiple of 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QBLOCK = 32
TILE = 16
KERNEL_GROUPS = (32, 64, 128)  # and per-channel (group == k), k a multiple of 32


def kernel_scheme_reason(bits: int, group: int, k: int) -> str | None:
    """None when the kernel runs this scheme on k inputs, else why not."""
    if (bits, group) == (6, 16):  # GGUF Q6_K, its own tiles (qweights_q6.py)
        from slimlm.kernels.qweights_q6 import q6k_scheme_reason

        return q6k_scheme_reason(k)
    if (bits, group) == (5, 32):  # GGUF Q5_0, its own tiles (qweights_q5.py)
        from slimlm.kernels.qweights_q5 import q5_0_scheme_reason

        return q5_0_scheme_reason(k)
    if bits not in (4, 8):
        return f"the C kernel runs 4- and 8-bit weights, not {bits}-bit"
    if k % QBLOCK:
        return f"the C kernel needs input widths that are multiples of {QBLOCK} (this one is {k})"
    if group not in KERNEL_GROUPS and group != k:
        return f"the C kernel runs groups of 32, 64, 128 or whole rows, not {group}"
    if k % group:
        return f"group size {group} does not divide {k} inputs"
    return None


@dataclass
class KernelWeight:
    """Codes, scales and (act-order) input permutation in the kernel's layout; `rows` x `k` logical."""

    codes: torch.Tensor  # uint8, flat
    scales: torch.Tensor  # float16 or float32, flat: [tiles, groups, 2, 16]
    perm: torch.Tensor | None  # int32 [k]
    rows: int
    k: int
    bits: int
    group: int

    @property
    def scale_bits(self) -> int:
        return {torch.float16: 16, torch.uint8: 8}.get(self.scales.dtype, 32)  # uint8: Q6_K's bytes

    @property
    def nbytes(self) -> int:
        perm = 0 if self.perm is None else self.perm.numel() * 4
        return self.codes.numel() + self.scales.numel() * self.scales.element_size() + perm

    def describe(self) -> str:
        if self.bits in (5, 6):
            return {5: "q5_0 g32", 6: "q6_k g16"}[self.bits]
        return f"int{self.bits} " + ("per-channel" if self.group == self.k else f"g{self.group}")


def pack(
    codes: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor,
    bits: int,
    group: int,
    perm: torch.Tensor | None = None,
) -> KernelWeight:
    """codes uint8 [rows, k] (< 2^bits), d and m float [rows, k / group] -> the kernel's layout."""
    rows, k = codes.shape
    reason = (
        kernel_scheme_reason(bits, group, k) if bits in (4, 8) else f"pack() makes int4/int8, not {bits}-bit"
    )
    if reason:
        raise ValueError(reason)
    pad = -rows % TILE
    codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad))
    d = torch.nn.functional.pad(d.float(), (0, 0, 0, pad))
    m = torch.nn.functional.pad(m.float(), (0, 0, 0, pad))
    tiles, nblk = (rows + pad) // TILE, k // QBLOCK
    if bits == 8:  # [T, 16, blk, 8 chunks, 4] -> [T, blk, chunk, 16, 4]
        packed = codes.view(tiles, TILE, nblk, 8, 4).permute(0, 2, 3, 1, 4)
    else:  # input j of a block = 8 chunk + 4 half + sub; byte (chunk, row, sub) = low | high << 4
        c = codes.view(tiles, TILE, nblk, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
        packed = c[:, :, :, 0] | (c[:, :, :, 1] << 4)
    scales = torch.stack([d, m], dim=1).view(tiles, TILE, 2, k // group).permute(0, 3, 2, 1)
    half = scales.to(torch.float16)
    exact = bool(torch.isfinite(half).all()) and torch.equal(half.float(), scales)
    scales = half if exact else scales
    return KernelWeight(
        packed.contiguous().view(-1),
        scales.contiguous().view(-1),
        None if perm is None else perm.to(torch.int32).contiguous(),
        rows,
        k,
        bits,
        group,
    )


def unpack(w: KernelWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [rows, k], d, m float32 [rows, k / group]): the inverse of `pack` (tests, reports)."""
    tiles, nblk, groups = -(-w.rows // TILE), w.k // QBLOCK, w.k // w.group
    if w.bits == 8:
        codes = w.codes.view(tiles, nblk, 8, TILE, 4).permute(0, 3, 1, 2, 4)
    else:
        b = w.codes.view(tiles, nblk, 4, TILE, 4)
        codes = torch.stack([b & 0xF, b >> 4], dim=3).permute(0, 4, 1, 2, 3, 5)  # [T, 16, blk, 4, 2, 4]
    codes = codes.reshape(tiles * TILE, w.k)[: w.rows]
    s = w.scales.float().view(tiles, groups, 2, TILE).permute(0, 3, 2, 1).reshape(tiles * TILE, 2, groups)
    return codes, s[: w.rows, 0], s[: w.rows, 1]


def dequantize(w: KernelWeight) -> torch.Tensor:
    """The float32 weight [rows, k] in the original input order (act-order undone)."""
    if w.bits == 6:
        from slimlm.kernels.qweights_q6 import dequantize_q6k

        return dequantize_q6k(w)
    if w.bits == 5:
        from slimlm.kernels.qweights_q5 import dequantize_q5_0

        return dequantize_q5_0(w)
    codes, d, m = unpack(w)
    v = codes.float().view(w.rows, -1, w.group) * d.unsqueeze(-1) + m.unsqueeze(-1)
    v = v.view(w.rows, w.k)
    if w.perm is None:
        return v
    out = torch.empty_like(v)
    out[:, w.perm.long()] = v
    return out


def from_quantized(qw) -> KernelWeight:
    """A slimlm QuantizedWeight (codes, scales, integer zeros, perm) -> kernel layout, exactly."""
    d = qw.scales.float()
    return pack(qw.codes, d, -qw.zeros.float() * d, qw.bits, qw.group_size, qw.perm)


def concat(weights: list[KernelWeight]) -> KernelWeight:
    """Row-stack weights that read the same input (q/k/v, gate/up): same k, bits, group and perm."""
    if weights[0].bits == 6:
        from slimlm.kernels.qweights_q6 import concat_q6k

        return concat_q6k(weights)
    if weights[0].bits == 5:
        from slimlm.kernels.qweights_q5 import concat_q5_0

        return concat_q5_0(weights)
    parts = [unpack(w) for w in weights]
    first = weights[0]
    return pack(
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]),
        first.bits,
        first.group,
        first.perm,
    )


def stack_rows(parts: list[KernelWeight]) -> KernelWeight:
    """Row blocks packed one by one (each a multiple of 16 rows but the last) -> one weight, the same
    bytes as packing them together: tiles are independent. Lets a vocab-sized table be repacked a few
    thousand rows at a time instead of holding its unpacked codes whole."""
    first = parts[0]
    if any(p.rows % TILE for p in parts[:-1]):
        raise ValueError("row blocks before the last must be multiples of 16 rows")
    same = len({p.scales.dtype for p in parts}) == 1  # fp16 throughout, fp32, or Q6_K's bytes
    scales = torch.cat([p.scales if same else p.scales.float() for p in parts])
    rows = sum(p.rows for p in parts)
    return KernelWeight(
        torch.cat([p.codes for p in parts]), scales, first.perm, rows, first.k, first.bits, first.group
    )
