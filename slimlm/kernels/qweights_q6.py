"""GGUF Q6_K in the C kernel's layout (kernels/gemm_q6.h): the file's own 6.5625 bits per weight.

Q6_K is w = d * sc * (q - 32): a 6-bit q, an int8 scale sc per 16 inputs and an fp16 d per 256. The
kernel keeps exactly that (`bits` 6, `group` 16 in a KernelWeight; the `scales` buffer is uint8 bytes
holding the sc and d of each tile), so nothing is rounded and nothing is widened: as bf16 these
tensors took 16 bits per weight, as int8 g16 codes with fp32 scale and minimum (d * sc has up to 18
significant bits, more than fp16 holds) 12.

Per tile of 16 rows and 32 inputs, 384 code bytes: the low nibbles in the int4 layout of gemm_q.h,
then two 64-byte planes of the top 2 bits; per tile and 256 inputs, 288 scale bytes: 16 x 16 int8 sc
(sub-block-major), then 16 fp16 d.
"""

from __future__ import annotations

import torch

TILE, QBLOCK, SUPER, SUB = 16, 32, 256, 16
BITS = 6


def q6k_scheme_reason(k: int) -> str | None:
    if k % SUPER:
        return (
            f"the C kernel runs Q6_K blocks on input widths that are multiples of {SUPER} (this one is {k})"
        )
    return None


def pack_q6k(codes: torch.Tensor, sc: torch.Tensor, d: torch.Tensor):
    """codes uint8 [rows, k] (0..63), sc int8 [rows, k / 16], d [rows, k / 256] (fp16 values) -> a
    KernelWeight with bits 6, group 16."""
    from slimlm.kernels.qweights import KernelWeight

    rows, k = codes.shape
    reason = q6k_scheme_reason(k)
    if reason:
        raise ValueError(reason)
    if codes.numel() and int(codes.max()) > 63:
        raise ValueError("Q6_K codes are 6 bits (0..63)")
    half = d.to(torch.float16)
    if not torch.equal(half.float(), d.float()):
        raise ValueError("Q6_K super-block scales must be fp16 values")
    pad = -rows % TILE
    codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad))
    sc = torch.nn.functional.pad(sc.to(torch.int8), (0, 0, 0, pad))
    half = torch.nn.functional.pad(half, (0, 0, 0, pad))
    tiles, nblk, nsup = (rows + pad) // TILE, k // QBLOCK, k // SUPER
    low, high = codes & 0x0F, codes >> 4
    c = low.view(tiles, TILE, nblk, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)  # [T, blk, chunk, half, row, j]
    low_bytes = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(tiles, nblk, 256)
    h = high.view(tiles, TILE, nblk, 2, 4, 4).permute(0, 2, 3, 1, 5, 4)  # [T, blk, plane, row, j, s]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    planes = (h << shifts).sum(-1, dtype=torch.uint8).reshape(tiles, nblk, 128)  # disjoint bits: sum = or
    data = torch.cat([low_bytes, planes], dim=-1).reshape(-1)
    scs = (
        sc.view(tiles, TILE, nsup, 16).permute(0, 2, 3, 1).contiguous().view(torch.uint8)
    )  # [T, S, sub, row]
    ds = half.view(tiles, TILE, nsup).permute(0, 2, 1).contiguous().view(torch.uint8)  # [T, S, 32 bytes]
    scales = torch.cat([scs.reshape(tiles, nsup, 256), ds.reshape(tiles, nsup, 32)], dim=-1).reshape(-1)
    return KernelWeight(data.contiguous(), scales.contiguous(), None, rows, k, BITS, SUB)


def unpack_q6k(w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [rows, k], sc int8 [rows, k / 16], d float32 [rows, k / 256]): the inverse of pack."""
    tiles, nblk, nsup = -(-w.rows // TILE), w.k // QBLOCK, w.k // SUPER
    data = w.codes.view(tiles, nblk, 384)
    b = data[:, :, :256].reshape(tiles, nblk, 4, TILE, 4)
    low = torch.stack([b & 0xF, b >> 4], dim=3)  # [T, blk, chunk, half, row, j]
    low = low.permute(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, w.k)
    p = data[:, :, 256:].reshape(tiles, nblk, 2, TILE, 4, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    high = (p >> shifts) & 3  # [T, blk, plane, row, j, s]
    high = high.permute(0, 3, 1, 2, 5, 4).reshape(tiles * TILE, w.k)
    s = w.scales.view(tiles, nsup, 288)
    sc = s[:, :, :256].contiguous().view(torch.int8).view(tiles, nsup, 16, TILE).permute(0, 3, 1, 2)
    d = s[:, :, 256:].contiguous().view(torch.float16).view(tiles, nsup, TILE).permute(0, 2, 1)
    codes = (low | (high << 4))[: w.rows]
    return codes, sc.reshape(tiles * TILE, -1)[: w.rows], d.reshape(tiles * TILE, -1)[: w.rows].float()


def dequantize_q6k(w) -> torch.Tensor:
    """float32 [rows, k]: (d * sc) * (q - 32), each product exact in float32 (gguf's values)."""
    codes, sc, d = unpack_q6k(w)
    scale = d.repeat_interleave(SUPER // SUB, dim=1) * sc.float()
    return ((codes.float() - 32).view(w.rows, -1, SUB) * scale.unsqueeze(-1)).view(w.rows, w.k)


def concat_q6k(weights):
    parts = [unpack_q6k(w) for w in weights]
    return pack_q6k(*(torch.cat([p[i] for p in parts]) for i in range(3)))
