"""Dequantize GGUF blocks with vectorised numpy: the legacy 32-element formats (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0) and the 256-element k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).

The bit layouts follow ggml's `dequantize_row_*` (ggml-quants.c); tests check every type against the
`gguf` package's reference `gguf.quants.dequantize` on the same bytes. Each function takes the raw
bytes of whole blocks ([rows, row_bytes] uint8, any leading shape) and returns float32 [rows, row_elems].
Types not listed here go to the `gguf` package (see gguf_file._dequantize).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

QK = 256  # elements per k-quant super-block


def _blocks(raw: np.ndarray, block_bytes: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """[..., row_bytes] -> [n_blocks, block_bytes] and the leading shape to restore."""
    lead = raw.shape[:-1]
    return raw.reshape(-1, block_bytes), lead


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per block -> float32 [n, 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32]: the 16 low nibbles, then the 16 high ones (ggml's legacy order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] bits (element j's fifth bit is bit j)."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
    return bits.astype(np.uint8)


def q8_0(raw: np.ndarray) -> np.ndarray:
    b, lead = _blocks(raw, 34)
    d = _f16(b[:, :2])
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)
    return (d * q).reshape(*lead, -1)


def q4_0(raw: np.ndarray) -> np.ndarray:
    b, lead = _blocks(raw, 18)
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).astype(np.int8) - 8
    return (d * q).reshape(*lead, -1)


def q4_1(raw: np.ndarray) -> np.ndarray:
    b, lead = _blocks(raw, 20)
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return (d * _nibbles(b[:, 4:]) + m).reshape(*lead, -1)


def q5_0(raw: np.ndarray) -> np.ndarray:
    b, lead = _blocks(raw, 22)
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)).astype(np.int8) - 16
    return (d * q).reshape(*lead, -1)


def q5_1(raw: np.ndarray) -> np.ndarray:
    b, lead = _blocks(raw, 24)
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return (d * q + m).reshape(*lead, -1)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins ([n, 8] each), ggml's get_scale_min_k4."""
    s = scales.astype(np.uint8)
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return np.concatenate([lo_sc, hi_sc], -1).astype(np.float32), np.concatenate([lo_m, hi_m], -1).astype(
        np.float32
    )


def _k4_values(qs: np.ndarray) -> np.ndarray:
    """[n, 128] bytes -> [n, 8, 32]: chunk j of 32 bytes gives sub-block 2j (low nibbles) and 2j+1 (high)."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32)


def q4_k(raw: np.ndarray) -> np.ndarray:
    b, lead = _blocks(raw, 144)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _k4_values(b[:, 16:144]).astype(np.float32)
    y = (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]
    return y.reshape(*lead, -1)


def q5_k(raw: np.ndarray) -> np.ndarray:
    b, lead = _blocks(raw, 176)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48]  # [n, 32]: bit i of byte l is the fifth bit of element l of sub-block i
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    q = (_k4_values(b[:, 48:176]) | (high << 4)).astype(np.float32)
    y = (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]
    return y.reshape(*lead, -1)


def q6_k(raw: np.ndarray) -> np.ndarray:
    b, lead = _blocks(raw, 210)
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # [n, half, 32-byte run, l]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)  # [n, half, 1, l]
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)  # [n, 16]
    d = _f16(b[:, 208:210])
    # Per half of 128: element 32*k + l (k = 0..3) takes low nibbles of run 0/1 for k 0/1, high for 2/3,
    # and bits 2k..2k+1 of qh[l].
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, 2, 4, 32]
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 3
    q = (low | (high << 4)).astype(np.int8).astype(np.float32) - 32  # [n, 2, 4, 32]
    # One scale per 16 elements: 16 scales over the 256 elements in order.
    y = q.reshape(-1, 16, 16) * scales[:, :, None] * d[:, :, None]
    return y.reshape(*lead, -1)


def q2_k(raw: np.ndarray) -> np.ndarray:
    b, lead = _blocks(raw, 84)
    scales = b[:, 0:16]  # low nibble: scale, high nibble: min, one pair per 16 elements
    qs = b[:, 16:80].reshape(-1, 2, 1, 32)  # [n, half, 1, l]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).astype(np.float32)  # [n, 2, 4, 32]: element 32*k + l of each half
    sc = (scales & 0x0F).astype(np.float32)
    mn = (scales >> 4).astype(np.float32)
    y = q.reshape(-1, 16, 16) * (d * sc)[:, :, None] - (dmin * mn)[:, :, None]
    return y.reshape(*lead, -1)


def q3_k(raw: np.ndarray) -> np.ndarray:
    b, lead = _blocks(raw, 110)
    hmask = b[:, 0:32].reshape(-1, 1, 1, 32)  # bit 4*half + k of hmask[l]: the high bit
    qs = b[:, 32:96].reshape(-1, 2, 1, 32)
    d = _f16(b[:, 108:110])
    # 16 six-bit scales, packed as ggml's dequantize_row_q3_K unpacks them (kmask1 / kmask2).
    aux = np.ascontiguousarray(b[:, 96:108]).view("<u4").astype(np.uint32)  # [n, 3]
    tmp = aux[:, 2]
    a0 = (aux[:, 0] & 0x0F0F0F0F) | (((tmp >> 0) & 0x03030303) << 4)
    a1 = (aux[:, 1] & 0x0F0F0F0F) | (((tmp >> 2) & 0x03030303) << 4)
    a2 = ((aux[:, 0] >> 4) & 0x0F0F0F0F) | (((tmp >> 4) & 0x03030303) << 4)
    a3 = ((aux[:, 1] >> 4) & 0x0F0F0F0F) | (((tmp >> 6) & 0x03030303) << 4)
    sc_bytes = np.stack([a0, a1, a2, a3], axis=1).astype("<u4").view(np.uint8).reshape(-1, 16)
    scales = sc_bytes.view(np.int8).astype(np.float32) - 32  # [n, 16]
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    low = (qs >> shifts) & 3  # [n, 2, 4, 32]
    bit = np.arange(2, dtype=np.uint8).reshape(1, 2, 1, 1) * 4 + np.arange(4, dtype=np.uint8).reshape(
        1, 1, 4, 1
    )
    high = (hmask >> bit) & 1
    q = low.astype(np.float32) - np.where(high == 1, 0.0, 4.0).astype(np.float32)
    y = q.reshape(-1, 16, 16) * (d * scales)[:, :, None]
    return y.reshape(*lead, -1)


# ggml type id -> dequantizer
DEQUANTIZERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: q4_0,
    3: q4_1,
    6: q5_0,
    7: q5_1,
    8: q8_0,
    10: q2_k,
    11: q3_k,
    12: q4_k,
    13: q5_k,
    14: q6_k,
}


def dequantize(raw: np.ndarray, qtype: int) -> np.ndarray | None:
    """float32 values of `raw` (whole blocks of ggml type `qtype`), or None for a type not handled here."""
    fn = DEQUANTIZERS.get(int(qtype))
    return None if fn is None else fn(raw)


def q4_k_groups(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K rows [rows, bytes] -> (codes uint8 [rows, k], scale, minimum float32 [rows, k / 32]) with
    value = scale * code + minimum: each of a 256-block's 8 sub-blocks of 32 is one such group
    (scale d * sc, minimum -dmin * m), so the kernel's int4 g32 format holds Q4_K exactly."""
    rows = raw.shape[0]
    b, _ = _blocks(raw, 144)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    codes = _k4_values(b[:, 16:144]).reshape(rows, -1)
    return codes, (d * sc).reshape(rows, -1), (-(dmin * mn)).reshape(rows, -1)


def q5_0_groups(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_0 rows -> (codes 0..31, scale d, minimum -16 d) per 32: exact in the kernel's int8 g32 format."""
    rows = raw.shape[0]
    b, _ = _blocks(raw, 22)
    d = _f16(b[:, :2])
    codes = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return codes.reshape(rows, -1), d.reshape(rows, -1), (-16.0 * d).reshape(rows, -1)


def q6_k_groups(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K rows [rows, bytes] -> (codes uint8 0..63 [rows, k], sc int8 [rows, k / 16], d float32
    [rows, k / 256]) with value = d * sc * (code - 32): the kernel's Q6_K form (kernels/qweights_q6.py)."""
    rows = raw.shape[0]
    b, _ = _blocks(raw, 210)
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # as q6_k above
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    codes = (low | (high << 4)).reshape(rows, -1)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).reshape(rows, -1)
    return codes, sc, _f16(b[:, 208:210]).reshape(rows, -1)
