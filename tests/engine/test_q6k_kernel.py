"""GGUF Q6_K on the C kernel in its own form (kernels/gemm_q6.h, kernels/qweights_q6.py): random Q6_K
blocks (any bytes are valid Q6_K) against the `gguf` package's dequantizer, and the kernel's GEMM against
float32 and against an exact emulation of its integer arithmetic, in the AVX-512 and portable builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimlm.kernels import build
from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
from slimlm.kernels.qweights import concat, dequantize, kernel_scheme_reason, stack_rows
from slimlm.kernels.qweights_q6 import pack_q6k, unpack_q6k
from slimlm.loading.gguf_kquants import q6_k_groups

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(
    build.load_kernel("decode_cpu") is None,
    reason=f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}",
)


def random_q6k(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw Q6_K rows: random codes and int8 scales, small fp16 super-block scales."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // 256 * 210), dtype=np.uint8)
    d = (rng.standard_normal((rows, k // 256)) * 1e-3).astype(np.float16)
    raw.reshape(rows, -1, 210)[:, :, 208:210] = d.view(np.uint8).reshape(rows, -1, 2)
    return raw


def weight_and_reference(rows: int, k: int, seed: int = 0):
    raw = random_q6k(rows, k, seed)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K).reshape(rows, k)
    parts = [torch.from_numpy(np.ascontiguousarray(a)) for a in q6_k_groups(raw)]
    return pack_q6k(*parts), torch.from_numpy(np.ascontiguousarray(ref)), parts


def emulated(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T with x rounded as the kernel rounds it (int8 per 32 with scale max|x| / 127), in float64."""
    n, k = x.shape
    blocks = x.view(n, -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))).clamp(-127, 127)
    prods = (q.double().unsqueeze(1) * w.double().view(1, w.shape[0], -1, 32)).sum(-1)
    return (prods * (amax / 127.0).double().view(n, 1, -1)).sum(-1)


def test_pack_is_exact_and_holds_the_files_bytes():
    w, ref, (codes, sc, d) = weight_and_reference(48, 512)
    assert torch.equal(dequantize(w), ref)  # gguf's own dequantizer on the same bytes
    back = unpack_q6k(w)
    assert torch.equal(back[0], codes) and torch.equal(back[1], sc) and torch.equal(back[2], d)
    assert w.nbytes == 48 * 512 // 256 * 210  # 6.5625 bits per weight, as the file
    assert w.describe() == "q6_k g16" and kernel_scheme_reason(6, 16, 512) is None
    assert "multiples of 256" in kernel_scheme_reason(6, 16, 640)
    assert torch.equal(dequantize(concat([w, weight_and_reference(16, 512, 1)[0]]))[:48], ref)
    assert torch.equal(dequantize(stack_rows([pack_q6k(codes[:32], sc[:32], d[:32]), pack_q6k(codes[32:], sc[32:], d[32:])])), ref)  # fmt: skip


def _check_kernel(rows: int = 40, k: int = 768):
    w, ref, _ = weight_and_reference(rows, k, seed=2)
    table = KernelLinear(w)
    embedded = KernelEmbedding(table, torch.float32, tied=True)(torch.tensor([0, 17, rows - 1]))
    assert torch.equal(embedded, ref[[0, 17, rows - 1]])  # the lookup is exact
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(0))
    y = table(x)
    exact = emulated(x, ref)
    assert ((y.double() - exact).abs().max() / exact.abs().max()) < 1e-6  # integer sums exact
    full = x @ ref.T
    assert (y - full).abs().max() < 0.02 * full.abs().max()  # against float32: int8 activations
    # a row's result does not depend on what else is in the batch (tiles of 8 sequences, remainders)
    assert torch.equal(torch.cat([table(x[i : i + 1]) for i in range(19)]), y)
    assert torch.equal(table(x[3:10]), y[3:10])


def test_kernel_gemm_and_lookup():
    _check_kernel()


def test_portable_build_gives_the_same_integers(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("SLIMLM_KERNEL_CFLAGS", "-mno-avx512f")
    build.load_kernel.cache_clear()
    try:
        from slimlm.kernels.library import any_library

        assert not any_library().slim_quant_fast_path()
        _check_kernel(rows=20, k=512)
    finally:
        build.load_kernel.cache_clear()
