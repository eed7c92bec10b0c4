"""GGUF Q5_0 in the C kernel's layout (kernels/gemm_q5.h): the file's own 5.5 bits per weight.

Q5_0 is w = d * (q - 16): a 5-bit q and an fp16 d per 32 inputs. The kernel keeps exactly that (`bits`
5, `group` 32 in a KernelWeight; the d live in the code stream, so `scales` is empty). Before this form
the loader widened Q5_0 to int8 g32 codes with an fp16 d and minimum: 9 bits per weight.

Per tile of 16 rows and 32 inputs, 352 bytes: the low nibbles in the int4 layout of gemm_q.h (256), one
64-byte plane of fifth bits (byte (row, j), bit s: input 4 s + j), the 16 rows' fp16 d (32).
"""

from __future__ import annotations

import torch

TILE, QBLOCK = 16, 32
BITS = 5


def q5_0_scheme_reason(k: int) -> str | None:
    if k % QBLOCK:
        return f"the C kernel needs input widths that are multiples of {QBLOCK} (this one is {k})"
    return None


def pack_q5_0(codes: torch.Tensor, d: torch.Tensor):
    """codes uint8 [rows, k] (0..31), d [rows, k / 32] (fp16 values) -> a KernelWeight, bits 5, group 32."""
    from slimlm.kernels.qweights import KernelWeight

    rows, k = codes.shape
    reason = q5_0_scheme_reason(k)
    if reason:
        raise ValueError(reason)
    if codes.numel() and int(codes.max()) > 31:
        raise ValueError("Q5_0 codes are 5 bits (0..31)")
    half = d.to(torch.float16)
    if not torch.equal(half.float(), d.float()):
        raise ValueError("Q5_0 scales must be fp16 values")
    pad = -rows % TILE
    codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad))
    half = torch.nn.functional.pad(half, (0, 0, 0, pad))
    tiles, nblk = (rows + pad) // TILE, k // QBLOCK
    c = (
        (codes & 0x0F).view(tiles, TILE, nblk, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
    )  # [T, blk, chunk, half, row, j]
    low = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(tiles, nblk, 256)
    h = (codes >> 4).view(tiles, TILE, nblk, 8, 4).permute(0, 2, 1, 4, 3)  # [T, blk, row, j, s]
    plane = (h << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8).reshape(tiles, nblk, 64)
    ds = half.view(tiles, TILE, nblk).permute(0, 2, 1).contiguous().view(torch.uint8)  # [T, blk, 32 bytes]
    data = torch.cat([low, plane, ds.reshape(tiles, nblk, 32)], dim=-1).reshape(-1).contiguous()
    return KernelWeight(data, torch.empty(0, dtype=torch.uint8), None, rows, k, BITS, QBLOCK)


def unpack_q5_0(w) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [rows, k], d float32 [rows, k / 32]): the inverse of pack."""
    tiles, nblk = -(-w.rows // TILE), w.k // QBLOCK
    data = w.codes.view(tiles, nblk, 352)
    b = data[:, :, :256].reshape(tiles, nblk, 4, TILE, 4)
    low = torch.stack([b & 0xF, b >> 4], dim=3).permute(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, w.k)
    p = data[:, :, 256:320].reshape(tiles, nblk, TILE, 4, 1)
    high = ((p >> torch.arange(8, dtype=torch.uint8)) & 1).permute(0, 2, 1, 4, 3).reshape(tiles * TILE, w.k)
    d = data[:, :, 320:].contiguous().view(torch.float16).view(tiles, nblk, TILE).permute(0, 2, 1)
    return (low | (high << 4))[: w.rows], d.reshape(tiles * TILE, nblk)[: w.rows].float()


def dequantize_q5_0(w) -> torch.Tensor:
    codes, d = unpack_q5_0(w)
    return ((codes.float() - 16).view(w.rows, -1, QBLOCK) * d.unsqueeze(-1)).view(w.rows, w.k)


def concat_q5_0(weights):
    parts = [unpack_q5_0(w) for w in weights]
    return pack_q5_0(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
