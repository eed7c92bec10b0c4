"""Runtime QuantLinear modules: each forward is a line or two over a real PyTorch kernel.

Backends, picked by `make_quant_linear` from the weight's scheme and the device:

- `Int4TinyGemmLinear`: 4-bit, group size 32/64/128, on CPU (`_weight_int4pack_mm_for_cpu`) and CUDA
  (`_weight_int4pack_mm`, the tinygemm kernel). Both compute W = (q - 8) * s + zf with a float zero zf,
  so our integer zero point z maps to zf = (8 - z) * s (torchao's `_quantize_affine_tinygemm` uses the
  same mid-point 8). Scales and zeros are bfloat16, activations are cast to bfloat16 for the kernel
  (the fp32 variants of these CPU kernels are much slower: docs/measured_choices.md).
- `Int8Linear`: 8-bit per-channel symmetric via `_weight_int8pack_mm` (the kernel takes one scale per
  output channel and no zero point; group-wise or asymmetric 8-bit weights use the fallback).
- `Int8PairLinear` (quant/int8pair.py): 8-bit group-wise (groups of 32/64/128), each code as two
  nibbles on the same int4 kernels (PyTorch has no grouped int8 kernel).
- `DequantLinear`: everything else; dequantizes the weight each forward and calls F.linear.

Kernel-specific packed tensors are bf16/int tensors stored under integer dtypes so that `model.to(dtype)`
leaves them alone; a move to another device type repacks for that device (see `QuantLinear._apply`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.quant.scheme import QuantizedWeight, dequantize_codes, pack_nibbles, unpack_nibbles

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


class QuantLinear(nn.Module):
    """Base of the weight-only quantized linears. `quantized_weight()` returns the portable form."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.bits, self.group_size = qweight.bits, qweight.group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("perm", qweight.perm)
        self._set_weight(qweight)

    def _set_weight(self, qweight: QuantizedWeight) -> None:
        raise NotImplementedError

    def quantized_weight(self) -> QuantizedWeight:
        """Codes, scales and zero points as a device-independent `QuantizedWeight`."""
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] this module multiplies by (original column order)."""
        return self.quantized_weight().dequantize(dtype)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def _prepare(self, x: torch.Tensor, dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
        """[..., in] -> [M, in] in the kernel's activation dtype, act-order permutation applied."""
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return x.reshape(-1, self.in_features).to(dtype or x.dtype)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[M, out] kernel output -> [..., out] in the caller's dtype, plus bias."""
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Packed layouts are device-specific: on a device change, unpack here and repack there.
        source = self.device
        target = fn(torch.empty(0, device=source)).device
        if target.type == source.type or target.type == "meta":
            return super()._apply(fn, recurse)
        portable = self.quantized_weight()
        super()._apply(fn, recurse)
        self._set_weight(portable.map_tensors(lambda t: t.to(target)))
        return self

    def extra_repr(self) -> str:
        perm = ", act_order" if self.perm is not None else ""
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}{perm}"
        )


class Int4TinyGemmLinear(QuantLinear):
    """4-bit group-wise weights on the int4 `_weight_int4pack_mm` kernels (CPU and CUDA)."""

    def _set_weight(self, qweight: QuantizedWeight) -> None:
        device = qweight.codes.device
        packed = _pack_int4(qweight.codes.to(torch.int32), device)
        scales = qweight.scales.to(torch.bfloat16)
        float_zeros = (8 - qweight.zeros.to(torch.float32)) * scales.float()
        scale_and_zero = torch.stack([scales, float_zeros.to(torch.bfloat16)], dim=-1)  # [out, groups, 2]
        # Float zero points (w = s·q + min, quantize --zero float) are kept as such when read back.
        self.float_zero = qweight.zeros.is_floating_point()
        self.register_buffer("packed", packed)
        # [groups, out, 2] as the kernels want; stored as int16 bits so dtype casts of the model skip it.
        self.register_buffer("scale_and_zero", scale_and_zero.transpose(0, 1).contiguous().view(torch.int16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if x.is_cpu else torch.ops.aten._weight_int4pack_mm
        y = mm(self._prepare(x), self.packed, self.group_size, self.scale_and_zero.view(torch.bfloat16))
        return self._finish(y, x)

    def quantized_weight(self) -> QuantizedWeight:
        sz = self.scale_and_zero.view(torch.bfloat16).transpose(0, 1)  # [out, groups, 2]
        scales, float_zeros = sz[..., 0], sz[..., 1].float()
        zeros = 8 - float_zeros / scales.float()
        zeros = zeros if getattr(self, "float_zero", False) else torch.round(zeros).to(torch.int32)
        codes = _unpack_int4(self.packed, self.out_features, self.in_features)
        return QuantizedWeight(codes, scales, zeros, 4, self.group_size, self.perm)


class Int8Linear(QuantLinear):
    """8-bit per-channel symmetric weights on `_weight_int8pack_mm`."""

    def _set_weight(self, qweight: QuantizedWeight) -> None:
        signed = (qweight.codes.to(torch.int16) - 128).to(torch.int8)
        self.register_buffer("weight_int8", signed)
        self.register_buffer("scales", qweight.scales.reshape(-1).to(torch.bfloat16).view(torch.int16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales.view(torch.bfloat16)
        if _kernel_works("int8", x.device.type):
            return self._finish(
                torch.ops.aten._weight_int8pack_mm(self._prepare(x), self.weight_int8, scales), x
            )
        w = self.weight_int8.to(x.dtype) * scales.to(x.dtype).unsqueeze(1)
        return self._finish(F.linear(self._prepare(x, None), w), x)

    def quantized_weight(self) -> QuantizedWeight:
        codes = (self.weight_int8.to(torch.int16) + 128).to(torch.uint8)
        scales = self.scales.view(torch.bfloat16).unsqueeze(1)
        zeros = torch.full_like(scales, 128, dtype=torch.int32)
        return QuantizedWeight(codes, scales, zeros, 8, self.in_features, self.perm)


class DequantLinear(QuantLinear):
    """Any scheme, any device: dequantize the weight, then F.linear."""

    def _set_weight(self, qweight: QuantizedWeight) -> None:
        codes = pack_nibbles(qweight.codes) if qweight.bits == 4 else qweight.codes
        self.register_buffer("codes", codes)
        self.register_buffer("scales", qweight.scales)
        self.register_buffer("zeros", storage_zeros(qweight.zeros))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = unpack_nibbles(self.codes) if self.bits == 4 else self.codes
        w = dequantize_codes(codes, self.scales.to(x.dtype), self.zeros, self.group_size)
        return self._finish(F.linear(self._prepare(x, None), w), x)

    def quantized_weight(self) -> QuantizedWeight:
        codes = unpack_nibbles(self.codes) if self.bits == 4 else self.codes
        return QuantizedWeight(
            codes, self.scales, portable_zeros(self.zeros), self.bits, self.group_size, self.perm
        )


def storage_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """How zero points are stored: uint8 (int16 past 255) when integer, float32 when float."""
    if zeros.is_floating_point():
        return zeros.to(torch.float32)
    return zeros.to(torch.uint8 if zeros.max() < 256 else torch.int16)


def portable_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """Stored zero points -> QuantizedWeight's: int32, or float32 for float zero points."""
    return zeros.to(torch.float32 if zeros.is_floating_point() else torch.int32)


def make_quant_linear(qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
    """The fastest backend for this weight on the device its tensors live on."""
    device_type = qweight.codes.device.type
    if qweight.bits == 4 and _tinygemm_fits(qweight, device_type):
        return Int4TinyGemmLinear(qweight, bias)
    per_channel = qweight.group_size == qweight.in_features
    if qweight.bits == 8 and per_channel and qweight.is_symmetric and device_type in ("cpu", "cuda"):
        return Int8Linear(qweight, bias)
    if qweight.bits == 8 and not per_channel:
        from slimlm.quant.int8pair import Int8PairLinear, pair_fits  # it builds on this module

        if pair_fits(qweight, device_type):
            return Int8PairLinear(qweight, bias)
    return DequantLinear(qweight, bias)


def _tinygemm_fits(qweight: QuantizedWeight, device_type: str) -> bool:
    if qweight.group_size not in TINYGEMM_GROUP_SIZES or not _kernel_works("int4", device_type):
        return False
    n_multiple, k_multiple = (16, 2) if device_type == "cpu" else (8, 32)
    return qweight.out_features % n_multiple == 0 and qweight.in_features % k_multiple == 0


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def _pack_int4(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 codes [N, K] -> the kernel's packed layout for `device`."""
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    # CUDA wants uint8 [N, K/2] with the even column in the high nibble (torchao does the same).
    high_first = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(high_first, _inner_k_tiles(codes.shape[1]))


def _read_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """All 4-bit fields of a packed tensor in storage order, low nibble of each element first."""
    bits = packed.element_size() * 8
    shifts = torch.arange(0, bits, 4, device=packed.device, dtype=torch.int32)
    words = packed.reshape(-1, 1).to(torch.int32) if bits == 8 else packed.reshape(-1, 1)
    return ((words >> shifts) & 0xF).reshape(-1)


@functools.lru_cache(maxsize=64)
def _int4_layout(n: int, k: int, device: torch.device) -> torch.Tensor:
    """For each nibble of the packed layout, the flat [N, K] index of the code stored there.

    Found by packing the bits of the index one bit-plane at a time; this treats the kernel's tiled
    layout as a black box, so it holds for the CPU and CUDA layouts alike.
    """
    index = torch.arange(n * k, device=device, dtype=torch.int64).view(n, k)
    source = torch.zeros(n * k, device=device, dtype=torch.int64)
    for bit in range(max(1, math.ceil(math.log2(n * k)))):
        plane = _read_nibbles(_pack_int4(((index >> bit) & 1).to(torch.int32), device)).to(torch.int64)
        if plane.numel() != n * k or int(plane.max()) > 1:
            raise RuntimeError("int4 pack layout is not a permutation of nibbles; cannot unpack it")
        source |= plane << bit
    return source


def _unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    plan = _unpack_plan(n, k, packed.device)
    if plan is not None:  # big matrices (a vocab-sized lm_head): no index of 8 bytes per weight
        return _gather_int4(packed, *plan, torch.arange(n, device=packed.device))
    nibbles = _read_nibbles(packed).to(torch.uint8)
    codes = torch.empty(n * k, dtype=torch.uint8, device=packed.device)
    codes[_int4_layout(n, k, packed.device)] = nibbles
    return codes.view(n, k)


ROW_PERIODS = (16, 32, 64, 128)


@functools.lru_cache(maxsize=16)
def _periodic_layout(k: int, device: torch.device) -> tuple[int, torch.Tensor] | None:
    """(P, offsets [P, K]) with code (r, c) at nibble (r // P)·P·K + offsets[r % P, c], found on a
    [256, K] probe (the CPU layout tiles 64 rows, CUDA's 8); None if no period up to 128 fits."""
    n = 2 * ROW_PERIODS[-1]
    try:
        source = _int4_layout(n, k, device)  # nibble position -> flat [n, k] index
    except RuntimeError:
        return None
    position = torch.empty_like(source)
    position[source] = torch.arange(source.numel(), device=device)  # flat [n, k] index -> nibble position
    for period in ROW_PERIODS:
        blocks = position.view(n // period, period * k)
        shifts = torch.arange(n // period, device=device).unsqueeze(1) * (period * k)
        if torch.equal(blocks - shifts, blocks[:1].expand_as(blocks)):
            return period, blocks[0].view(period, k).clone()
    return None


@functools.lru_cache(maxsize=64)
def _unpack_plan(n: int, k: int, device: torch.device) -> tuple[int, torch.Tensor] | None:
    """The periodic layout if it holds for all n rows, checked by unpacking one random [n, k] pack."""
    plan = _periodic_layout(k, device)
    if plan is None or n % plan[0] or n <= 2 * ROW_PERIODS[-1]:  # small: the exact index is cheap
        return None
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n), dtype=torch.int32).to(
        device
    )
    unpacked = _gather_int4(_pack_int4(codes, device), *plan, torch.arange(n, device=device))
    return plan if torch.equal(unpacked, codes.to(torch.uint8)) else None


def _gather_int4(
    packed: torch.Tensor, period: int, offsets: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """uint8 codes [len(rows), K] of the given rows, 4096 rows at a time (the index is int64)."""
    k = offsets.shape[1]
    parts = []
    for chunk in rows.split(4096):
        index = (chunk // period * (period * k)).unsqueeze(1) + offsets[chunk % period]
        parts.append(_nibbles_at(packed, index).to(torch.uint8))
    return torch.cat(parts) if parts else torch.empty(0, k, dtype=torch.uint8, device=packed.device)


def _nibbles_at(packed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """4-bit fields at nibble positions `index`, counted like `_read_nibbles` (little-endian bytes)."""
    flat = packed.reshape(-1).view(torch.uint8)
    return (flat[index >> 1].to(torch.int32) >> ((index & 1) * 4).to(torch.int32)) & 0xF


@functools.cache
def _kernel_works(kind: str, device_type: str) -> bool:
    """Probe once per device type: kernels can be missing for a build or an older GPU."""
    if device_type not in ("cpu", "cuda"):
        return False
    try:
        x = torch.zeros(1, 64, dtype=torch.bfloat16, device=device_type)
        if kind == "int8":
            w = torch.zeros(16, 64, dtype=torch.int8, device=device_type)
            torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(16, dtype=torch.bfloat16, device=device_type))
        else:
            device = torch.device(device_type)
            packed = _pack_int4(torch.zeros(16, 64, dtype=torch.int32, device=device), device)
            sz = torch.ones(2, 16, 2, dtype=torch.bfloat16, device=device_type)
            mm = (
                torch.ops.aten._weight_int4pack_mm_for_cpu
                if device_type == "cpu"
                else torch.ops.aten._weight_int4pack_mm
            )
            mm(x, packed, 32, sz)
        return True
    except (RuntimeError, NotImplementedError):
        return False
