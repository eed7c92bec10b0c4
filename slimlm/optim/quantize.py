"""Vectorized building blocks: nearest-code lookup, nibble packing, block-wise absmax and rank-1 scales.

Rounding is to the nearest table entry; a value exactly on the midpoint of two entries takes the lower one
(the rule of the low-bit-optimizers CUDA kernel). Scales ignore non-finite values, so one NaN or Inf
gradient poisons only its own element (as in torch's AdamW), not its whole block, row or column.

Codes come from a lookup table indexed by the top bits of each value's float32 pattern (sign, exponent
and a few mantissa bits, as many as the table needs so that no bucket holds two decision boundaries) plus
one comparison with the boundary inside the bucket: exact nearest rounding at the cost of two gathers,
where a binary search (torch.searchsorted) is much slower on CPU (docs/measured_choices.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Divisors are clamped to this so an all-zero block or row gives codes for 0 instead of 0/0 = NaN.
TINY = torch.finfo(torch.float32).tiny
_MAX_MANTISSA_BITS = 10


class TableTensors(NamedTuple):
    """A code table's tensors on one device."""

    values: torch.Tensor  # [L] float32, sorted
    midpoints: torch.Tensor  # [L-1] decision boundaries
    pairs: torch.Tensor  # [256, 2]: byte -> values of its low and high nibble (tables of <= 16 entries)
    thresholds: torch.Tensor  # [buckets] float32: the one midpoint inside each bucket (+inf if none)
    below: torch.Tensor  # [buckets] uint8: the code of values <= threshold (above it: code + 1)
    shift: int  # bucket = float32 bits >> shift (sign, exponent, 23 - shift mantissa bits)


class CodeTable:
    """A sorted code table of at most 256 float32 values, with its lookup tensors cached per device."""

    def __init__(self, values: torch.Tensor) -> None:
        if values.ndim != 1 or not 2 <= values.numel() <= 256 or not bool((values[1:] > values[:-1]).all()):
            raise ValueError("a code table is a strictly increasing 1-D tensor of 2 to 256 values")
        self.values = values.to(torch.float32)
        self._per_device: dict[torch.device, TableTensors] = {}

    def tensors(self, device: torch.device) -> TableTensors:
        if device not in self._per_device:
            self._per_device[device] = _build_tensors(self.values, device)
        return self._per_device[device]


def _build_tensors(values: torch.Tensor, device: torch.device) -> TableTensors:
    midpoints = (values[1:] + values[:-1]) / 2
    padded = torch.zeros(16, dtype=torch.float32)
    padded[: min(16, values.numel())] = values[:16]
    byte = torch.arange(256)
    pairs = torch.stack((padded[byte & 15], padded[byte >> 4]), dim=1)
    for mantissa_bits in range(_MAX_MANTISSA_BITS + 1):
        lookup = _bucket_lookup(midpoints, mantissa_bits)
        if lookup is not None:
            break
    else:
        raise ValueError("code table too fine for a bucket lookup: two midpoints closer than 2^-10 relative")
    thresholds, below, shift = lookup
    return TableTensors(
        values=values.to(device),
        midpoints=midpoints.to(device),
        pairs=pairs.to(device),
        thresholds=thresholds.to(device),
        below=below.to(device),
        shift=shift,
    )


def _bucket_lookup(
    midpoints: torch.Tensor, mantissa_bits: int
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Per bucket of float32 bit patterns: the midpoint inside it and the code below it; None if some
    bucket holds two midpoints."""
    shift = 23 - mantissa_bits
    bucket = torch.arange(1 << (9 + mantissa_bits), dtype=torch.int64)
    first = (bucket << shift).to(torch.int32).view(torch.float32)
    last = (((bucket + 1) << shift) - 1).to(torch.int32).view(torch.float32)
    lo = torch.minimum(first, last).nan_to_num(nan=0.0)  # NaN patterns: any valid code will do
    hi = torch.maximum(first, last).nan_to_num(nan=0.0)
    code_lo = torch.searchsorted(midpoints, lo)
    code_hi = torch.searchsorted(midpoints, hi)
    if int((code_hi - code_lo).max()) > 1:
        return None
    inside = midpoints[code_lo.clamp(max=midpoints.numel() - 1)]
    thresholds = torch.where(code_hi > code_lo, inside, torch.tensor(float("inf")))
    return thresholds, code_lo.to(torch.uint8), shift


def lookup_codes(x: torch.Tensor, t: TableTensors) -> torch.Tensor:
    """uint8 index of the nearest table entry for each value of x (float32, already scaled)."""
    bucket = x.contiguous().view(torch.int32).reshape(-1) >> t.shift
    bucket &= t.thresholds.numel() - 1  # drops the sign extension of negative patterns
    below = t.below.index_select(0, bucket)
    above = x.reshape(-1) > t.thresholds.index_select(0, bucket)
    return below.add_(above).view(x.shape)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: element 2i in the low nibble, 2i+1 in the high one. Length must be even."""
    pairs = codes.view(-1, 2)  # [n/2, 2]
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_values(codes: torch.Tensor, t: TableTensors, packed: bool) -> torch.Tensor:
    """Flat float32 table values of uint8 codes (two per byte if packed)."""
    if packed:
        return t.pairs.index_select(0, codes.to(torch.int32)).view(-1)
    return t.values.index_select(0, codes.to(torch.int32))


def padded_length(numel: int, multiple: int) -> int:
    return -(-numel // multiple) * multiple


def finite_abs_max(x: torch.Tensor, dim: int | list[int], nonnegative: bool = False) -> torch.Tensor:
    """max |x| along dim, ignoring NaN and Inf (an all-non-finite slice gives 0)."""
    magnitude = x if nonnegative else x.abs()
    if magnitude.numel() == 0:  # an empty FSDP shard: zero maxima of the reduced shape
        return magnitude.new_zeros(magnitude.sum(dim=dim).shape)
    out = magnitude.amax(dim=dim)
    # Rare path: redo with non-finite values zeroed only when some maximum came out NaN or Inf.
    if not bool(torch.isfinite(out).all()):
        out = magnitude.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).amax(dim=dim)
    return out


def blockwise_encode(
    x: torch.Tensor, t: TableTensors, block_size: int, packed: bool, nonnegative: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of x / absmax(block) (uint8, padded to whole blocks; two per byte if packed) and absmax."""
    flat = x.reshape(-1).float()
    pad = padded_length(flat.numel(), block_size) - flat.numel()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    blocks = flat.view(-1, block_size)  # [blocks, block_size]
    absmax = finite_abs_max(blocks, dim=1, nonnegative=nonnegative)
    codes = lookup_codes(blocks / absmax.clamp_min(TINY)[:, None], t).view(-1)
    return (pack_nibbles(codes) if packed else codes), absmax


def blockwise_decode(
    codes: torch.Tensor, absmax: torch.Tensor, t: TableTensors, shape: torch.Size, packed: bool
) -> torch.Tensor:
    """Inverse of `blockwise_encode`: a fresh contiguous float32 tensor of `shape`."""
    values = unpack_values(codes, t, packed)
    scaled = values.view(absmax.numel(), -1) * absmax[:, None]  # [blocks, block_size]
    return scaled.view(-1)[: shape.numel()].view(shape)


def rank1_maxima(x: torch.Tensor) -> list[torch.Tensor]:
    """For each dim d of x (ndim >= 2, values >= 0), max over all other dims: a vector of length x.shape[d]."""
    return [finite_abs_max(x, [o for o in range(x.ndim) if o != d], nonnegative=True) for d in range(x.ndim)]


def rank1_scale(maxima: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise min over dims of the broadcast maxima: the rank-1 normalizer of Li et al. 2023."""
    ndim = len(maxima)
    scale = None
    for d, vec in enumerate(maxima):
        shape = [1] * ndim
        shape[d] = -1
        scale = vec.view(shape) if scale is None else torch.minimum(scale, vec.view(shape))
    return scale


def rank1_encode(x: torch.Tensor, t: TableTensors) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Packed 4-bit codes of x / rank1_scale (x >= 0; flat, padded to even length) and per-dim maxima."""
    x = x.float()
    maxima = rank1_maxima(x)
    codes = lookup_codes(x / rank1_scale([vec.clamp_min(TINY) for vec in maxima]), t).view(-1)
    if codes.numel() % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return pack_nibbles(codes), maxima


def rank1_decode(packed: torch.Tensor, maxima: list[torch.Tensor], t: TableTensors) -> torch.Tensor:
    """Inverse of `rank1_encode`: a fresh contiguous float32 tensor shaped like the maxima say."""
    shape = [vec.numel() for vec in maxima]
    numel = 1
    for size in shape:
        numel *= size
    values = unpack_values(packed, t, packed=True)[:numel].view(shape)
    return values * rank1_scale(maxima)
