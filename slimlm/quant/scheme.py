"""The portable quantized-weight representation every algorithm produces and every kernel consumes.

A weight W [out, in] is stored as unsigned integer codes q in [0, 2^bits - 1] with one scale s and one
integer zero point z per (row, group of `group_size` consecutive input columns):

    W[:, perm][r, c] = (q[r, c] - z[r, c // group_size]) * s[r, c // group_size]

Symmetric quantization is the special case z = 2^(bits-1) everywhere. `perm` (optional) is the input
permutation that GPTQ's act-order produces: groups are contiguous in the permuted column order, so the
runtime gathers x[..., perm] once and then runs an ordinary group-wise kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError

SUPPORTED_BITS = (4, 8)
# -1 = one group spanning the whole row (per-channel scales).
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)


def check_scheme(bits: int, group_size: int, in_features: int | None = None, name: str = "") -> int:
    """Validate (bits, group_size) against what slimlm supports; returns the effective group size."""
    if bits not in SUPPORTED_BITS:
        raise SlimlmError(f"unsupported bits {bits}: slimlm quantizes weights to 8 or 4 bits")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise SlimlmError(
            f"unsupported group size {group_size}: use 32, 64, 128 or -1 (one scale per output channel)"
        )
    if in_features is None:
        return group_size
    if group_size == -1:
        return in_features
    if in_features % group_size:
        where = f" of {name}" if name else ""
        raise SlimlmError(
            f"group size {group_size} does not divide the {in_features} input features{where}: "
            f"pick a group size that divides {in_features} (or -1 for per-channel)"
        )
    return group_size


@dataclass
class QuantizedWeight:
    """Codes, scales and zero points of one linear weight (see the module docstring for the formula)."""

    codes: torch.Tensor  # uint8 [out, in], values in [0, 2^bits - 1], columns in permuted order
    scales: torch.Tensor  # float [out, in // group_size]
    zeros: torch.Tensor  # integer [out, in // group_size]
    bits: int
    group_size: int  # effective size: in_features when per-channel
    perm: torch.Tensor | None = None  # int64 [in]: the kernel sees x[..., perm]

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def is_symmetric(self) -> bool:
        return bool((self.zeros == 2 ** (self.bits - 1)).all())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] in the original column order."""
        w = dequantize_codes(self.codes, self.scales.float(), self.zeros, self.group_size).to(dtype)
        if self.perm is None:
            return w
        unpermuted = torch.empty_like(w)
        unpermuted[:, self.perm] = w
        return unpermuted

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedWeight:
        """A copy with `fn` applied to every tensor (device moves, dtype casts of the scales)."""
        perm = None if self.perm is None else fn(self.perm)
        return QuantizedWeight(
            fn(self.codes), fn(self.scales), fn(self.zeros), self.bits, self.group_size, perm
        )


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """(q - z) * s group-wise, in the dtype of `scales`; columns stay in the order of `codes`."""
    out, n_in = codes.shape
    grouped = codes.view(out, n_in // group_size, group_size).to(scales.dtype)  # [out, groups, gs]
    centered = grouped - zeros.to(scales.dtype).unsqueeze(-1)
    return (centered * scales.unsqueeze(-1)).view(out, n_in)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols] with values < 16 -> uint8 [rows, cols / 2]; the even column goes in the low nibble."""
    low, high = codes[:, 0::2], codes[:, 1::2]
    return (low | (high << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).view(packed.shape[0], -1)  # [rows, cols]


def perm_from_g_idx(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Turn GPTQ's per-column group index into an input permutation with contiguous groups.

    Returns None when the groups are already contiguous (no act-order, or static groups).
    """
    g_idx = g_idx.to(torch.int64)
    perm = torch.argsort(g_idx, stable=True)
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // group_size
    if not torch.equal(g_idx[perm], expected):
        raise SlimlmError(
            f"g_idx does not split the {g_idx.numel()} input columns into groups of {group_size}: "
            "the checkpoint's group_size and g_idx disagree"
        )
    if torch.equal(perm, torch.arange(g_idx.numel(), device=g_idx.device)):
        return None
    return perm
