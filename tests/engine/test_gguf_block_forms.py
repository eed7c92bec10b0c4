"""GGUF Q6_K and Q5_0 on the C kernel in their own forms, at the file's bytes (kernels/gemm_q6.h,
gemm_q5.h; kernels/qweights_q6.py, qweights_q5.py): random blocks against the `gguf` package's
dequantizer, and the kernel's GEMM against float32 and against an exact emulation of its integer
arithmetic, in the AVX-512 and portable builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimlm.kernels import build
from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
from slimlm.kernels.qweights import concat, dequantize, kernel_scheme_reason, stack_rows
from slimlm.kernels.qweights_q5 import pack_q5_0, unpack_q5_0
from slimlm.kernels.qweights_q6 import pack_q6k, unpack_q6k
from slimlm.loading.gguf_kquants import q5_0_groups, q6_k_groups

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(
    build.load_kernel("decode_cpu") is None,
    reason=f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}",
)
# type: (elements and bytes per block, offset of the fp16 d in a block, bits per weight)
FORMS = {"Q6_K": (256, 210, 208, 6.5625), "Q5_0": (32, 22, 0, 5.5)}


def random_blocks(kind: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw rows of `kind`: random bytes (every byte pattern is a valid block), small fp16 d."""
    elems, size, at, _ = FORMS[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // elems * size), dtype=np.uint8)
    d = (rng.standard_normal((rows, k // elems)) * 1e-3).astype(np.float16)
    raw.reshape(rows, -1, size)[:, :, at : at + 2] = d.view(np.uint8).reshape(rows, -1, 2)
    return raw


def weight_and_reference(kind: str, rows: int, k: int, seed: int = 0):
    raw = random_blocks(kind, rows, k, seed)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(rows, k)
    if kind == "Q6_K":
        parts = [torch.from_numpy(np.ascontiguousarray(a)) for a in q6_k_groups(raw)]
        weight = pack_q6k(*parts)
    else:
        codes, d, _ = (torch.from_numpy(np.ascontiguousarray(a)) for a in q5_0_groups(raw))
        parts = [codes, d]
        weight = pack_q5_0(codes, d)
    return weight, torch.from_numpy(np.ascontiguousarray(ref)), parts


def emulated(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T with x rounded as the kernel rounds it (int8 per 32 with scale max|x| / 127), in float64."""
    n, k = x.shape
    blocks = x.view(n, -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))).clamp(-127, 127)
    prods = (q.double().unsqueeze(1) * w.double().view(1, w.shape[0], -1, 32)).sum(-1)
    return (prods * (amax / 127.0).double().view(n, 1, -1)).sum(-1)


@pytest.mark.parametrize("kind", FORMS)
def test_pack_is_exact_and_holds_the_files_bytes(kind):
    w, ref, parts = weight_and_reference(kind, 48, 512)
    assert torch.equal(dequantize(w), ref)  # gguf's own dequantizer on the same bytes
    back = (unpack_q6k if kind == "Q6_K" else unpack_q5_0)(w)
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(back, parts, strict=True))
    assert w.nbytes * 8 == 48 * 512 * FORMS[kind][3]  # the file's bits per weight
    assert w.describe() == {"Q6_K": "q6_k g16", "Q5_0": "q5_0 g32"}[kind]
    assert kernel_scheme_reason(w.bits, w.group, 512) is None
    assert "multiples of" in kernel_scheme_reason(w.bits, w.group, 640 if kind == "Q6_K" else 80)
    other, other_ref, _ = weight_and_reference(kind, 16, 512, seed=1)
    assert torch.equal(dequantize(concat([w, other])), torch.cat([ref, other_ref]))
    pack = pack_q6k if kind == "Q6_K" else pack_q5_0
    halves = [pack(*(p[:32] for p in parts)), pack(*(p[32:] for p in parts))]
    assert torch.equal(dequantize(stack_rows(halves)), ref)


def _check_kernel(kind: str, rows: int = 40, k: int = 768):
    w, ref, _ = weight_and_reference(kind, rows, k, seed=2)
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


@pytest.mark.parametrize("kind", FORMS)
def test_kernel_gemm_and_lookup(kind):
    _check_kernel(kind)


def test_portable_build_gives_the_same_integers(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("SLIMLM_KERNEL_CFLAGS", "-mno-avx512f")
    build.load_kernel.cache_clear()
    try:
        from slimlm.kernels.library import any_library

        assert not any_library().slim_quant_fast_path()
        for kind in FORMS:
            _check_kernel(kind, rows=20, k=512)
    finally:
        build.load_kernel.cache_clear()
