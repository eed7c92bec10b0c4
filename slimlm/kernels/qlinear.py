"""PyTorch modules over the C kernel's quantized weights: the one copy both paths read.

Once the engine hands a quantized model to the C decode kernel (slimlm/engine/backend.py), its
QuantLinear / QuantEmbedding modules are replaced by these, which hold the weights in the kernel's layout
(kernels/qweights.py). Decode steps read the buffers from C; prefill and any other PyTorch call runs
the same buffers through the kernel's GEMM (`slim_linear`, AVX512-VNNI), so the weights are held once.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from slimlm.kernels.library import Weight, any_library
from slimlm.kernels.qweights import QBLOCK, KernelWeight, dequantize

ROW_CHUNK = 256  # rows per slim_linear call (prefill scratch; see KernelLinear.forward)


class KernelLinear(nn.Module):
    """y = x W^T + b with W in the kernel's int4/int8 layout; inference only."""

    def __init__(self, weight: KernelWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.rows, weight.k
        self.bits, self.group_size = weight.bits, weight.group
        self.register_buffer("codes", weight.codes)
        self.register_buffer("qscales", weight.scales)
        self.register_buffer("perm", weight.perm)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def kernel_weight(self) -> KernelWeight:
        return KernelWeight(self.codes, self.qscales, self.perm, self.out_features, self.in_features, self.bits,
                            self.group_size)  # fmt: skip

    def weight_struct(self) -> Weight:
        """The C descriptor (pointers into this module's buffers: keep the module alive)."""
        perm = None if self.perm is None else self.perm.data_ptr()
        scale_bits = 16 if self.qscales.dtype == torch.float16 else 32
        return Weight(self.codes.data_ptr(), self.qscales.data_ptr(), perm, self.out_features, self.in_features,
                      self.bits, self.group_size, scale_bits)  # fmt: skip

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.kernel_weight()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, out_features, threads = self.in_features, self.out_features, torch.get_num_threads()
        flat = x.reshape(-1, k)
        n = flat.shape[0]
        bf16 = x.dtype == torch.bfloat16
        out = torch.empty(n, out_features, dtype=x.dtype)
        # A long prefill runs ROW_CHUNK rows per call: the input copy, int8 codes and float32 result are
        # scratch for one chunk, not for the whole prompt (that scratch was the largest part of a w4
        # prefill's peak RSS). Each row's result does not depend on the others in the call, and a chunk
        # is long enough for the many-rows GEMM (gemm_qpanel.h) to amortise its unpacked panels.
        chunk = max(1, min(n, ROW_CHUNK))
        xq = torch.empty(chunk * k, dtype=torch.int8)
        sums = torch.empty(2, chunk * (k // QBLOCK), dtype=torch.float32)
        weight = self.weight_struct()
        lib = any_library()
        if bf16:  # bf16 in and out in C: the same bits, no float32 copies
            xf = torch.empty(threads * k, dtype=torch.float32)
            yf = torch.empty(chunk * out_features, dtype=torch.float32)  # untouched where C writes bf16
        else:
            y = torch.empty(chunk, out_features, dtype=torch.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            if bf16:
                rows = flat[start : start + m].contiguous()
                lib.slim_linear_bf16(ctypes.byref(weight), rows.data_ptr(), m, xq.data_ptr(), sums[0].data_ptr(),
                                     sums[1].data_ptr(), None, xf.data_ptr(), yf.data_ptr(),
                                     out[start : start + m].data_ptr(), threads)  # fmt: skip
            else:
                rows = flat[start : start + m].float().contiguous()
                lib.slim_linear(ctypes.byref(weight), rows.data_ptr(), m, xq.data_ptr(), sums[0].data_ptr(),
                                sums[1].data_ptr(), None, y.data_ptr(), threads)  # fmt: skip
                out[start : start + m] = y[:m]
        out = out.view(*x.shape[:-1], out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        perm = ", act_order" if self.perm is not None else ""
        return f"in={self.in_features}, out={self.out_features}, {self.kernel_weight().describe()}, C kernel{perm}"


class KernelEmbedding(nn.Module):
    """Token embedding over a KernelLinear's table (the tied lm_head's own, or its own child)."""

    def __init__(
        self, table: KernelLinear, dtype: torch.dtype, tied: bool, lookup_scale: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.dtype, self.tied = dtype, tied
        if tied:  # owned by the lm_head: not a child, so the model holds and counts it once
            self.__dict__["_shared_table"] = table
        else:
            self.own_table = table
        div = None if lookup_scale is None else lookup_scale.detach().float().reshape(-1).contiguous()
        self.register_buffer("lookup_scale", div)

    @property
    def table(self) -> KernelLinear:
        return self.__dict__["_shared_table"] if self.tied else self.own_table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError("token id outside the embedding table")
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=torch.float32)
        weight = self.table.weight_struct()
        div = None if self.lookup_scale is None else self.lookup_scale.data_ptr()
        any_library().slim_embed(ctypes.byref(weight), flat.data_ptr(), flat.numel(), div, out.data_ptr())
        return out.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.kernel_weight().describe()}, tied={self.tied}"
