"""Group-wise int8 weights on PyTorch's int4 kernels: each 8-bit code as two 4-bit codes (same bytes).

PyTorch has no kernel for int8 weights with group scales (`_weight_int8pack_mm` takes one scale per
output channel), and dequantizing to bf16 every step costs several passes over the weight (the old
`DequantLinear` path: w8 decoded at 0.2x bf16 on the PyTorch path, docs/quantization.md). An 8-bit code
q = 16·h + l splits into two nibbles, and

    d·(q - z)·x  =  d·((h - 8)·(16x) + (l - 8)·x) + (136 - z)·d·x

so one int4 GEMM (`_weight_int4pack_mm_for_cpu`, CUDA's tinygemm `_weight_int4pack_mm`) over doubled
inputs gives the grouped int8 product: per group g of `gs` columns, the kernel's group of 2·gs holds
[h_g | l_g], the inputs are [16·x_g | x_g] (16·x is exact in bf16), its scale is d and its float zero
(136 - z)·d / 17 (the kernel computes w = (c - 8)·s + zf, and 16 + 1 = 17 inputs share each zero).
The nibbles take the int8 codes' bytes; the kernel's bf16 [scale, zero] pairs add 4 bytes per group.

Many-row calls (prefill, batches above `DEQUANT_ROWS`) dequantize `CHUNK_ROWS` output rows at a time
into one reused bf16 scratch buffer and run F.linear on it (oneDNN / cuBLAS): the int4 kernel's work
grows with the rows, a dequantized GEMM's does not.

Exactness: the kernel rounds d and the zero term to bf16 (as `Int8Linear` and the int4 backends do); the
exact scales (float32 or float16, as the checkpoint stores them) and zero points are kept beside it, so
`quantized_weight()` (saving, the C kernel's repack) and the many-row path use them unrounded.
"""

from __future__ import annotations

import threading

import torch

from slimlm.quant.linear import (
    TINYGEMM_GROUP_SIZES,
    QuantLinear,
    _gather_int4,
    _kernel_works,
    _pack_int4,
    _periodic_layout,
    _unpack_int4,
    portable_zeros,
    storage_zeros,
)
from slimlm.quant.scheme import QuantizedWeight

# Above this many rows a call dequantizes and runs a bf16 GEMM (measured: benchmarks/torch_w8_kernels.py).
DEQUANT_ROWS = 32
PACK_ROWS = 4096
CHUNK_ROWS = 2048  # output rows dequantized at a time (the scratch is CHUNK_ROWS x in_features bf16)


def pair_fits(qweight: QuantizedWeight, device_type: str) -> bool:
    """Whether this 8-bit group-wise weight can run as nibble pairs on the device's int4 kernel."""
    if qweight.bits != 8 or qweight.zeros.is_floating_point():
        return False
    if not pair_shape_fits(qweight.out_features, qweight.in_features, qweight.group_size, device_type):
        return False
    return _kernel_works("int4", device_type)


INPUT_MULT_BYTES = 4  # Int8PairLinear's `input_mult`: (16, 1) in bf16


def pair_shape_fits(
    out_features: int, in_features: int, group_size: int | None, device_type: str = "cpu"
) -> bool:
    """Whether an 8-bit weight of this shape and group size takes the nibble-pair layout (the int4
    kernel's group sizes and row / column multiples); the planner asks this too."""
    if (
        not group_size
        or group_size <= 0
        or group_size == in_features
        or 2 * group_size not in TINYGEMM_GROUP_SIZES
    ):
        return False
    n_multiple, k_multiple = (16, 2) if device_type == "cpu" else (8, 32)
    return out_features % n_multiple == 0 and (2 * in_features) % k_multiple == 0


def pair_extra_bytes(
    out_features: int, in_features: int, group_size: int, scale_bytes: int, sym: bool
) -> int:
    """What Int8PairLinear holds beyond QuantLinear's layout (codes + a bf16 scale and zero per group):
    the exact scales as stored (`scale_bytes`: 4 for float32, 2 for fp16) and, unless symmetric, a uint8
    zero point, per group per row; and the input multipliers (16, 1) as two bf16."""
    groups = -(-in_features // group_size)
    return out_features * groups * (scale_bytes + (0 if sym else 1)) + INPUT_MULT_BYTES


def pair_codes(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 nibbles [N, 2K]: per group [high nibbles | low nibbles]."""
    n, k = codes.shape
    grouped = codes.to(torch.int32).view(n, k // group_size, 1, group_size)
    return torch.cat([grouped >> 4, grouped & 15], dim=2).view(n, 2 * k)


def unpair_codes(nibbles: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of `pair_codes` (any integer dtype) -> uint8 [N, K]."""
    n = nibbles.shape[0]
    grouped = nibbles.to(torch.int32).view(n, -1, 2, group_size)
    return (grouped[:, :, 0] * 16 + grouped[:, :, 1]).to(torch.uint8).view(n, -1)


_workspaces = threading.local()


def workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch tensor reused across calls (per thread, grown as needed): the many-row path would
    otherwise allocate and page-fault megabytes per linear per step. Its size is that of the largest
    chunk seen: 2 bytes (bf16) + 1 byte (two uint8 halves) per weight of in_features x min(out, CHUNK_ROWS),
    3,538,944 bytes for SmolLM2 (a 2048-row chunk of the 576-wide table); kept for the thread's life."""
    cache = getattr(_workspaces, "tensors", None)
    if cache is None:
        cache = _workspaces.tensors = {}
    key = (name, dtype, device)
    tensor = cache.get(key)
    if tensor is None or tensor.numel() < numel:
        tensor = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return tensor[:numel]


def _pack_pairs(codes: torch.Tensor, group_size: int, device: torch.device) -> torch.Tensor:
    """The int4 kernel's packed nibble pairs. On the CPU, 4096 rows at a time (the layout's 64-row blocks
    are independent): the int32 input is 8 bytes per weight, 226 MB at once for a 49152 x 576 table."""
    n = codes.shape[0]
    if device.type != "cpu" or n <= PACK_ROWS or n % 64:
        return _pack_int4(pair_codes(codes, group_size), device)
    parts = [
        _pack_int4(pair_codes(codes[i : i + PACK_ROWS], group_size), device) for i in range(0, n, PACK_ROWS)
    ]
    return torch.cat(parts)


class Int8PairLinear(QuantLinear):
    """8-bit group-wise weights (groups of 32/64/128, any integer zero point) on the int4 kernels."""

    def _set_weight(self, qweight: QuantizedWeight) -> None:
        device = qweight.codes.device
        self.register_buffer("packed", _pack_pairs(qweight.codes, self.group_size, device))
        # Exact scales (float32 or float16, as given) and zero points: quantized_weight() and the
        # many-row path read these. Stored as integer bits so that model.to(dtype) cannot round them.
        scales = qweight.scales
        scales = scales if scales.dtype in (torch.float32, torch.float16, torch.bfloat16) else scales.float()
        self.scale_dtype = scales.dtype
        bits = torch.int32 if scales.element_size() == 4 else torch.int16
        self.register_buffer("scale_bits", scales.contiguous().view(bits).clone())
        self.symmetric = bool((qweight.zeros == 128).all())
        # zero points only where they are not all 128 (the symmetric 8-bit default needs none)
        self.register_buffer("zeros", None if self.symmetric else storage_zeros(qweight.zeros))
        scale = qweight.scales.to(torch.bfloat16)
        zero = (136 - qweight.zeros.to(torch.float32)) * scale.float() / 17
        scale_and_zero = torch.stack([scale, zero.to(torch.bfloat16)], dim=-1)  # [out, groups, 2]
        # [groups, out, 2] as the kernels want, stored as int16 bits so dtype casts of the model skip it.
        self.register_buffer("scale_and_zero", scale_and_zero.transpose(0, 1).contiguous().view(torch.int16))
        mult = torch.tensor([16.0, 1.0], dtype=torch.bfloat16, device=device).view(2, 1)
        self.register_buffer("input_mult", mult.view(torch.int16))  # int16 bits: model casts skip it
        self._blocks = None
        self._plan_key, self._plan = None, None
        # The row period was found on a probe matrix: check it on this one's first and last rows.
        n = self.out_features
        rows = torch.cat([torch.arange(min(64, n)), torch.arange(max(0, n - 64), n)]).to(device)
        if self.row_plan() is not None and not torch.equal(self.row_codes(rows), qweight.codes[rows]):
            self._plan_key, self._plan = (device, self.packed.data_ptr()), None

    @property
    def scales(self) -> torch.Tensor:
        """The exact scales [out, groups] (float32 or float16)."""
        return self.scale_bits.view(self.scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > DEQUANT_ROWS and (self._cpu_blocks() or (not x.is_cpu and self.row_plan() is not None)):
            return self._finish(self._dequantized_mm(self._prepare(x, None)), x)
        # The one-row decode step: as few ops as possible around the kernel (each costs microseconds).
        g, gs = self.in_features // self.group_size, self.group_size
        xs = x if self.perm is None else x.index_select(-1, self.perm)
        xs = xs.reshape(rows, g, 1, gs)
        if xs.dtype != torch.bfloat16:
            xs = xs.to(torch.bfloat16)
        doubled = torch.mul(xs, self.input_mult.view(torch.bfloat16)).view(rows, 2 * self.in_features)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if x.is_cpu else torch.ops.aten._weight_int4pack_mm
        y = mm(doubled, self.packed, 2 * gs, self.scale_and_zero.view(torch.bfloat16))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _dequantized_mm(self, xs: torch.Tensor) -> torch.Tensor:
        """x @ W^T with W dequantized `CHUNK_ROWS` output rows at a time, as W^T [in, rows] (see
        `_dequantize_t`), into a scratch tensor reused across calls (`workspace`)."""
        n = self.out_features
        rows = min(n, CHUNK_ROWS)
        scratch = workspace("weight", self.in_features * rows, xs.dtype, xs.device).view(
            self.in_features, rows
        )
        if rows == n:
            return torch.mm(xs, self._dequantize_t(0, n, scratch))
        out = torch.empty(xs.shape[0], n, dtype=xs.dtype, device=xs.device)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            out[:, start:stop] = torch.mm(xs, self._dequantize_t(start, stop, scratch[:, : stop - start]))
        return out

    def _dequantize_t(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """W[start:stop]^T, dequantized into `out` [in, stop - start], read from the CPU kernel's layout
        with byte ops (`_cpu_blocks`): per 64 rows, byte (k, j) of a block holds row j's nibble of
        column k low and row 32 + j's high; a code's two nibbles lie in columns (g, 0, i) and (g, 1, i)
        of the doubled input. Writing k-major, the result is W^T with no transposing copy."""
        k, g, gs = self.in_features, self.in_features // self.group_size, self.group_size
        blocks = (stop - start) // 64
        if not self._cpu_blocks():  # another layout (CUDA's): gather the rows' codes by the row plan
            codes = self.row_codes(torch.arange(start, stop, device=self.packed.device))
            out.copy_((codes ^ 0x80).view(torch.int8).T)
            return self._scale_t(start, stop, out)
        pairs = self.packed.view(-1, 2 * k, 32)[start // 64 : stop // 64].view(blocks, g, 2, gs, 32)
        high, low = pairs[:, :, 0], pairs[:, :, 1]  # [blocks, g, gs, 32]: bytes of high / low nibbles
        target = out.view(k, blocks, 2, 32)
        # Byte ops on contiguous tensors, then one converting copy each into W^T's rows (32-byte runs).
        size, device = blocks * k * 32, out.device
        first = workspace("first", size, torch.uint8, device).view_as(high)
        other = workspace("other", size, torch.uint8, device).view_as(high)
        torch.bitwise_left_shift(high, 4, out=first).bitwise_or_(torch.bitwise_and(low, 15, out=other))
        first.bitwise_xor_(0x80)  # rows j: q - 128 as int8 bits
        target[:, :, 0].copy_(first.view(torch.int8).view(blocks, k, 32).transpose(0, 1))
        torch.bitwise_and(high, 0xF0, out=first).bitwise_or_(torch.bitwise_right_shift(low, 4, out=other))
        first.bitwise_xor_(0x80)  # rows 32 + j
        target[:, :, 1].copy_(first.view(torch.int8).view(blocks, k, 32).transpose(0, 1))
        return self._scale_t(start, stop, out)

    def _scale_t(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """`out` [in, rows] holding (q - 128)^T -> the dequantized W[start:stop]^T, in place."""
        g, gs, n = self.in_features // self.group_size, self.group_size, stop - start
        grouped = out.view(g, gs, n)
        if not self.symmetric:
            grouped.sub_(self.zeros[start:stop].T.to(out.dtype).contiguous().unsqueeze(1) - 128)
        # scales [g, 1, n] contiguous along n, as the weight: a vectorized multiply
        return grouped.mul_(self.scales[start:stop].T.to(out.dtype).contiguous().unsqueeze(1)).view_as(out)

    def _cpu_blocks(self) -> bool:
        """Whether the packed layout is the CPU kernel's 64-row blocks (checked once on its offsets)."""
        if self._blocks is None:
            plan = self.row_plan()
            ok = plan is not None and plan[0] == 64 and self.packed.device.type == "cpu"
            if ok:
                rows = torch.arange(64).unsqueeze(1)
                cols = torch.arange(2 * self.in_features).unsqueeze(0)
                ok = torch.equal(plan[1].cpu(), cols * 64 + (rows % 32) * 2 + rows // 32)
            self._blocks = ok
        return self._blocks

    def row_codes(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 codes [len(rows), in] of the given rows (1-D int tensor), gathered from the packed layout."""
        plan = self.row_plan()
        if plan is None:  # a layout without a row period: unpack everything (correct, slow)
            return unpair_codes(_unpack_int4(self.packed, self.out_features, 2 * self.in_features),
                                self.group_size)[rows]  # fmt: skip
        return unpair_codes(_gather_int4(self.packed, *plan, rows), self.group_size)

    def row_plan(self) -> tuple[int, torch.Tensor] | None:
        """(P, offsets) locating each row's nibbles in the packed layout (linear._periodic_layout), or None."""
        key = (self.packed.device, self.packed.data_ptr())
        if key != self._plan_key:
            plan = _periodic_layout(2 * self.in_features, self.packed.device)
            if plan is not None and self.out_features % plan[0]:
                plan = None
            self._plan_key, self._plan = key, plan
        return self._plan

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] (original column order); QLoRA's backward calls this every step,
        so the CPU layout is read with the many-row path's byte ops instead of an index gather."""
        if not self._cpu_blocks():
            return super().dequantized_weight(dtype)
        n, k = self.out_features, self.in_features
        wt = torch.empty(k, n, dtype=torch.float32, device=self.packed.device)  # float32, then rounded once
        for start in range(0, n, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, n)
            self._dequantize_t(start, stop, wt[:, start:stop])
        w = wt.T.to(dtype)
        if self.perm is None:
            return w.contiguous()
        unpermuted = torch.empty(n, k, dtype=dtype, device=w.device)
        unpermuted[:, self.perm] = w
        return unpermuted

    def quantized_weight(self) -> QuantizedWeight:
        codes = self.row_codes(torch.arange(self.out_features, device=self.packed.device))
        rows = torch.arange(self.out_features, device=self.packed.device)
        return QuantizedWeight(codes, self.scales, self.row_zeros(rows), 8, self.group_size, self.perm)

    def row_zeros(self, rows: torch.Tensor) -> torch.Tensor:
        """int32 zero points [len(rows), groups] of the given rows."""
        if self.zeros is None:
            groups = self.in_features // self.group_size
            return torch.full((len(rows), groups), 128, dtype=torch.int32, device=self.packed.device)
        return portable_zeros(self.zeros[rows])

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int4 nibble pairs"
