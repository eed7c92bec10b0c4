"""The many-rows int4/int8 GEMM (kernels/gemm_qpanel.h: prefill and wide batches) against the decode
tiles of gemm_q.h, bit for bit.

`slim_linear` takes the many-rows path from 32 rows on (QPANEL_MIN_ROWS in gemm_q.h) and the 8-row
decode tiles below; every row's result is the same bits whatever the batch, so the same rows run all at
once and in chunks of at most 8 must agree exactly. Random layouts: int4 groups of 32/64/128 and int8
per channel, fp16 and fp32 scales, act-order, output widths that are not whole tiles or panels, row
counts below, at and above the threshold and not multiples of the register block."""

from __future__ import annotations

import pytest
import torch

from slimlm.kernels import build
from slimlm.kernels.qlinear import KernelLinear
from slimlm.kernels.qweights import dequantize, pack

pytestmark = pytest.mark.skipif(
    build.load_kernel("decode_cpu") is None,
    reason=f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}",
)

# (bits, group (-1: per channel), rows of the weight, k, fp16 scales, act-order)
LAYOUTS = [
    (4, 32, 72, 96, True, False),
    (4, 64, 40, 192, False, False),
    (4, 64, 50, 128, True, True),
    (4, 128, 33, 256, False, False),
    (8, -1, 48, 160, True, False),
    (8, -1, 17, 64, False, True),
    (8, 32, 96, 64, False, False),
]
ROWS = [1, 7, 31, 32, 33, 45, 97, 300]


def random_linear(bits, group, rows, k, f16, act_order, seed=0) -> KernelLinear:
    gen = torch.Generator().manual_seed(seed)
    group = k if group == -1 else group
    codes = torch.randint(0, 2**bits, (rows, k), generator=gen, dtype=torch.uint8)
    d = torch.rand(rows, k // group, generator=gen) * 0.02 + 1e-3
    m = -(torch.rand(rows, k // group, generator=gen) * 0.1)
    if f16:
        d, m = d.half().float(), m.half().float()
    perm = torch.randperm(k, generator=gen) if act_order else None
    weight = pack(codes, d, m, bits, group, perm)
    assert (weight.scales.dtype == torch.float16) == f16
    return KernelLinear(weight)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: "-".join(map(str, v)))
def test_many_rows_equal_the_decode_tiles_bit_for_bit(layout):
    lin = random_linear(*layout)
    gen = torch.Generator().manual_seed(1)
    scale = torch.rand(1, lin.in_features, generator=gen) * 4  # channels of different sizes
    x = torch.randn(max(ROWS), lin.in_features, generator=gen) * scale
    x[5, :] = 0.0  # an all-zero row: zero activation scales
    with torch.inference_mode():
        tiles = torch.cat([lin(x[i : i + 8]) for i in range(0, x.shape[0], 8)])  # the decode tiles
        for n in ROWS:
            assert torch.equal(lin(x[:n]), tiles[:n]), f"{n} rows"
        assert torch.equal(lin(x[60:97]), tiles[60:97])  # a block of rows that starts mid-tile
    reference = x.double() @ dequantize(lin.kernel_weight()).double().T
    assert (tiles.double() - reference).abs().max() < 0.02 * reference.abs().max()


def test_prefill_of_a_wide_layer_keeps_every_row():
    """An output width of many panels, the last one a single tile of 8 outputs (the lm_head's case)."""
    lin = random_linear(4, 64, 1000, 128, False, False, seed=2)
    x = torch.randn(70, 128, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(lin(x), torch.cat([lin(x[i : i + 8]) for i in range(0, 70, 8)]))


@pytest.mark.parametrize("layout", [LAYOUTS[1], LAYOUTS[2], LAYOUTS[4]], ids=lambda v: "-".join(map(str, v)))
def test_bf16_rows_in_and_out_give_the_float_paths_bits_rounded(layout):
    """bf16 models call slim_linear_bf16 (no float32 copies): the float path's result rounded to bf16,
    on the decode tiles (few rows) and where the many-rows GEMM writes bf16 itself."""
    lin = random_linear(*layout, seed=4)
    x = torch.randn(70, lin.in_features, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x[3, :7] = torch.tensor([1e-40, -1e-40, 3e38, -3e38, 0.0, -0.0, 1.0])  # subnormals, near-overflow sums
    with torch.inference_mode():
        for n in (5, 32, 70):
            got = lin(x[:n])
            assert got.dtype == torch.bfloat16
            assert torch.equal(got.view(torch.int16), lin(x[:n].float()).to(torch.bfloat16).view(torch.int16))


def test_portable_build_keeps_the_same_properties(tmp_path, monkeypatch):
    """Without AVX512-VNNI every row takes the portable loop: still batch-independent, bf16 = rounded float."""
    monkeypatch.setenv("SLIMLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("SLIMLM_KERNEL_CFLAGS", "-mno-avx512f")
    build.load_kernel.cache_clear()
    try:
        from slimlm.kernels.library import any_library

        assert not any_library().slim_quant_fast_path()
        lin = random_linear(*LAYOUTS[2], seed=6)
        x = torch.randn(40, lin.in_features, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
        with torch.inference_mode():
            together = lin(x.float())
            assert torch.equal(together, torch.cat([lin(x[i : i + 8].float()) for i in range(0, 40, 8)]))
            assert torch.equal(lin(x).view(torch.int16), together.to(torch.bfloat16).view(torch.int16))
    finally:
        build.load_kernel.cache_clear()
