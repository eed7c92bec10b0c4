"""AutoAWQ (GEMM) and GPTQ checkpoint layouts, read against packers written here from the layouts' spec.

The packers below follow the producers' reference loops (AutoAWQ `WQLinear_GEMM.from_linear`, AutoGPTQ
`QuantLinear.pack`) element by element and share no code with slimlm's unpackers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quant.format import load_quantized_state, unpack_awq_gemm, unpack_gptq
from slimlm.quant.linear import QuantLinear

AWQ_ORDER_SPEC = [0, 2, 4, 6, 1, 3, 5, 7]


def _to_int32(words: int) -> int:
    return words - (1 << 32) if words >= (1 << 31) else words


def pack_awq(int_matrix: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit values -> [rows, cols/8] int32, word nibble i = column 8c + order[i]."""
    rows, cols = int_matrix.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for r in range(rows):
        for c in range(cols // 8):
            word = 0
            for i in range(8):
                word |= int(int_matrix[r, c * 8 + AWQ_ORDER_SPEC[i]]) << (4 * i)
            out[r, c] = _to_int32(word)
    return out


def pack_gptq_rows(int_matrix: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] -> [rows*bits/32, cols]: word (r, c) holds rows r*k..r*k+k-1, first in the lowest bits."""
    k = 32 // bits
    rows, cols = int_matrix.shape
    out = torch.zeros(rows // k, cols, dtype=torch.int32)
    for r in range(rows // k):
        for c in range(cols):
            word = 0
            for j in range(k):
                word |= (int(int_matrix[r * k + j, c]) & (2**bits - 1)) << (bits * j)
            out[r, c] = _to_int32(word)
    return out


def pack_gptq_cols(int_matrix: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_gptq_rows(int_matrix.T.contiguous(), bits).T.contiguous()


def _random_asym(out, n_in, bits, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out, n_in), generator=g)
    zeros = torch.randint(1, 2**bits, (out, n_in // group_size), generator=g)  # v1 cannot store 0
    scales = (torch.rand(out, n_in // group_size, generator=g) + 0.1).half()
    # The reference dequantization straight from the spec: W[o, i] = (q - z[group(i)]) * s[group(i)].
    weight = (codes - zeros.repeat_interleave(group_size, 1)) * scales.float().repeat_interleave(
        group_size, 1
    )
    return codes, zeros, scales, weight


def test_awq_gemm_layout():
    codes, zeros, scales, weight = _random_asym(32, 64, 4, 32)
    qweight = pack_awq(codes.T.contiguous())  # AutoAWQ packs W^T: [in, out/8]
    qzeros = pack_awq(zeros.T.contiguous())  # [groups, out/8]
    q = unpack_awq_gemm(qweight, qzeros, scales.T.contiguous(), 32)
    assert torch.equal(q.codes.long(), codes) and torch.equal(q.zeros.long(), zeros)
    torch.testing.assert_close(q.dequantize(), weight)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_layout(bits, checkpoint_format):
    codes, zeros, scales, weight = _random_asym(16, 64, bits, 32, seed=bits)
    offset = 1 if checkpoint_format == "gptq" else 0
    qweight = pack_gptq_rows(codes.T.contiguous(), bits)  # [in*bits/32, out]
    qzeros = pack_gptq_cols((zeros - offset).T.contiguous(), bits)  # [groups, out*bits/32]
    g_idx = (torch.arange(64) // 32).to(torch.int32)
    q = unpack_gptq(qweight, qzeros, scales.T.contiguous(), g_idx, bits, 32, zero_offset=offset)
    assert q.perm is None
    torch.testing.assert_close(q.dequantize(), weight)


def test_gptq_act_order_g_idx():
    # With act-order, column j belongs to group g_idx[j], and the groups are not contiguous in j.
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(64, generator=g)
    g_idx = torch.empty(64, dtype=torch.int32)
    g_idx[order] = (torch.arange(64) // 16).to(torch.int32)
    codes = torch.randint(0, 16, (16, 64), generator=g)
    zeros = torch.randint(1, 16, (16, 4), generator=g)
    scales = (torch.rand(16, 4, generator=g) + 0.1).half()
    weight = (codes - zeros[:, g_idx.long()]) * scales.float()[:, g_idx.long()]
    q = unpack_gptq(pack_gptq_rows(codes.T.contiguous(), 4), pack_gptq_cols((zeros - 1).T.contiguous(), 4),
                    scales.T.contiguous(), g_idx, 4, 16)  # fmt: skip
    assert q.perm is not None
    torch.testing.assert_close(q.dequantize(), weight)


def _skeleton():
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Module()])
    model.model.layers[0].proj = nn.Linear(64, 32, bias=True)
    model.lm_head = nn.Linear(64, 8, bias=False)
    return model


@pytest.mark.parametrize("kind", ["awq", "gptq"])
def test_load_quantized_state_swaps_modules_and_returns_the_rest(kind):
    codes, zeros, scales, weight = _random_asym(32, 64, 4, 32, seed=9)
    bias = torch.randn(32).half()
    if kind == "awq":
        tensors = {"qweight": pack_awq(codes.T.contiguous()), "qzeros": pack_awq(zeros.T.contiguous())}
        config = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}
    else:
        tensors = {"qweight": pack_gptq_rows(codes.T.contiguous(), 4),
                   "qzeros": pack_gptq_cols((zeros - 1).T.contiguous(), 4),
                   "g_idx": (torch.arange(64) // 32).to(torch.int32)}  # fmt: skip
        config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False}
    tensors.update(scales=scales.T.contiguous(), bias=bias)
    state = {f"model.layers.0.proj.{k}": v for k, v in tensors.items()}
    state["lm_head.weight"] = torch.randn(8, 64)
    model = _skeleton()
    rest = load_quantized_state(model, state, config)
    assert set(rest) == {"lm_head.weight"}
    layer = model.model.layers[0].proj
    assert isinstance(layer, QuantLinear)
    x = torch.randn(3, 64)
    expected = x @ weight.T + bias.float()
    assert float((layer(x) - expected).abs().max() / expected.abs().max()) < 1e-2


def test_load_errors():
    codes, zeros, scales, _ = _random_asym(32, 64, 4, 32)
    state = {"model.layers.0.proj.qweight": pack_awq(codes.T.contiguous()),
             "model.layers.0.proj.qzeros": pack_awq(zeros.T.contiguous()),
             "model.layers.0.proj.scales": scales.T.contiguous()}  # fmt: skip
    awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}
    with pytest.raises(SlimlmError, match="version 'gemv'"):
        load_quantized_state(_skeleton(), state, {**awq, "version": "gemv"})
    with pytest.raises(SlimlmError, match="3-bit"):
        load_quantized_state(_skeleton(), state, {"quant_method": "gptq", "bits": 3, "group_size": 32})
    with pytest.raises(SlimlmError, match="unsupported quantization method 'bitsandbytes'"):
        load_quantized_state(_skeleton(), state, {"quant_method": "bitsandbytes"})
    with pytest.raises(SlimlmError, match="lacks qzeros"):
        load_quantized_state(_skeleton(), {k: v for k, v in state.items() if "qzeros" not in k}, awq)
    with pytest.raises(SlimlmError, match="does not have"):
        load_quantized_state(_skeleton(), {k.replace("proj", "other"): v for k, v in state.items()}, awq)
    small = _skeleton()
    small.model.layers[0].proj = nn.Linear(64, 16)
    with pytest.raises(SlimlmError, match="the model expects 16x64"):
        load_quantized_state(small, state, awq)
