"""Runtime QuantLinear modules: kernels agree with dequantized-weight matmuls, packing round-trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm.quant.int8pair import Int8PairLinear
from slimlm.quant.linear import DequantLinear, Int4TinyGemmLinear, Int8Linear, make_quant_linear
from slimlm.quant.rtn import rtn_quantize
from slimlm.quant.scheme import QuantizedWeight


def _random_quantized(out, n_in, bits, group_size, sym=False, seed=0):
    torch.manual_seed(seed)
    return rtn_quantize(torch.randn(out, n_in), bits, group_size, sym)


def _assert_matches_dequantized(module, qweight, x, bias=None, rel=1e-2):
    reference = F.linear(x.float(), qweight.dequantize(), bias)
    out = module(x)
    assert out.shape == reference.shape and out.dtype == x.dtype
    # bf16 activations/scales inside the kernels: compare relative to the output's scale.
    err = (out.float() - reference).abs().max() / reference.abs().max()
    assert err < rel, f"relative error {err:.2e}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_quant_linear_equals_dequantized_matmul(bits, group_size, sym):
    qweight = _random_quantized(48, 256, bits, group_size, sym)
    bias = torch.randn(48)
    module = make_quant_linear(qweight, bias)
    # group-wise 8-bit runs as nibble pairs on the int4 kernel (quant/int8pair.py)
    expected = Int4TinyGemmLinear if bits == 4 else Int8PairLinear
    assert type(module) is expected
    _assert_matches_dequantized(module, qweight, torch.randn(2, 5, 256), bias)
    _assert_matches_dequantized(module, qweight, torch.randn(1, 256), bias)  # decode-like M=1


def test_per_channel_symmetric_int8_uses_the_int8_kernel():
    qweight = _random_quantized(64, 192, 8, -1, sym=True)
    module = make_quant_linear(qweight)
    assert type(module) is Int8Linear
    _assert_matches_dequantized(module, qweight, torch.randn(3, 192))
    asymmetric = make_quant_linear(_random_quantized(64, 192, 8, -1, sym=False))
    assert type(asymmetric) is DequantLinear  # the int8 kernel has no zero point


def test_bf16_activations_and_model_dtype_casts():
    qweight = _random_quantized(32, 128, 4, 32)
    module = make_quant_linear(qweight, torch.randn(32))
    module.to(torch.bfloat16)  # packed scales are stored as integer bits: the cast must not touch them
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    _assert_matches_dequantized(module, qweight, x, module.bias.float(), rel=2e-2)
    assert torch.equal(module.quantized_weight().codes, qweight.codes)


@pytest.mark.parametrize(
    "bits,group_size,sym", [(4, 32, False), (4, 128, True), (8, -1, True), (8, 64, False)]
)
def test_quantized_weight_round_trips_through_every_backend(bits, group_size, sym):
    qweight = _random_quantized(48, 256, bits, group_size, sym)
    back = make_quant_linear(qweight).quantized_weight()
    assert torch.equal(back.codes, qweight.codes)
    assert torch.equal(back.zeros.to(torch.int32), qweight.zeros.to(torch.int32))
    # Kernel backends keep bf16 scales: exact up to bf16 rounding.
    torch.testing.assert_close(back.scales.float(), qweight.scales, rtol=2**-8, atol=0)


def test_unpack_of_cpu_int4_layout_is_exact_for_odd_shapes():
    # 48 rows is not a multiple of the CPU kernel's 32-row blocks; the black-box layout must still invert.
    codes = torch.randint(0, 16, (48, 96), dtype=torch.uint8)
    qweight = QuantizedWeight(codes, torch.rand(48, 3) + 0.1, torch.randint(0, 16, (48, 3)), 4, 32)
    module = Int4TinyGemmLinear(qweight, None)
    assert torch.equal(module.quantized_weight().codes, codes)


def test_act_order_permutation_is_applied_to_inputs():
    qweight = _random_quantized(32, 128, 4, 32)
    qweight.perm = torch.randperm(128)
    for module in (make_quant_linear(qweight), DequantLinear(qweight, None)):
        _assert_matches_dequantized(module, qweight, torch.randn(3, 128))
        assert torch.equal(module.quantized_weight().perm, qweight.perm)


def test_shapes_the_int4_kernel_cannot_take_fall_back_to_dequantize():
    qweight = _random_quantized(40, 128, 4, 32)  # 40 rows: the CPU kernel needs a multiple of 16
    module = make_quant_linear(qweight)
    assert type(module) is DequantLinear
    _assert_matches_dequantized(module, qweight, torch.randn(2, 128), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size,sym", [(4, 64, False), (4, 128, True), (8, -1, True)])
def test_cuda_kernels_and_device_moves(bits, group_size, sym):
    qweight = _random_quantized(64, 256, bits, group_size, sym)
    module = make_quant_linear(qweight.map_tensors(lambda t: t.cuda()), torch.randn(64, device="cuda"))
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(x.float(), qweight.dequantize().cuda(), module.bias.float())
    assert (module(x).float() - reference).abs().max() / reference.abs().max() < 2e-2
    moved = module.cpu()  # repacks for the CPU kernel
    assert torch.equal(moved.quantized_weight().codes, qweight.codes)
    back = moved.cuda()
    assert torch.equal(back.quantized_weight().codes.cpu(), qweight.codes)
