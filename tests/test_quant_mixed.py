"""Float zero points, an 8-bit embedding table beside 4-bit weights, and per-linear group sizes (issue 19).

References: weights built on a Q4_1 grid (w = d·c + m, as llama.cpp's Q4_1 stores a block) straight
from that definition, the tiny HF model's own float forward, and a save/load round trip into another
skeleton; the C kernel's repack (kernels/qweights.py) is checked against the portable dequantization.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from slimlm.errors import SlimlmError
from slimlm.quant.embedding import QuantEmbedding
from slimlm.quant.format import load_quantized_state, save_quantized
from slimlm.quant.gptq import gptq_quantize
from slimlm.quant.linear import QuantLinear
from slimlm.quant.quantize import quantize_model, quantized_weight_bytes
from slimlm.quant.rtn import rtn_quantize
from tests.tiny_models import make_hf_model


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_model("llama")  # hidden 64, intermediate 96, 2 layers


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 32), generator=g) for _ in range(2)]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _q4_1_grid(out=16, n_in=128, block=32, seed=0):
    """Weights exactly on a Q4_1 grid per block of 32, each block using codes 0 and 15."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, n_in // block, block), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(out, n_in // block, 1, generator=g) * 0.02 + 0.001).half().float()
    m = (-torch.rand(out, n_in // block, 1, generator=g) * 0.15).half().float()
    return (codes * d + m).view(out, n_in)


def test_float_zero_reproduces_a_q4_1_grid_exactly():
    w = _q4_1_grid()
    exact = rtn_quantize(w, 4, 32, float_zero=True).dequantize()
    torch.testing.assert_close(exact, w, rtol=0, atol=1e-6)
    integer = rtn_quantize(w, 4, 32).dequantize()  # the integer zero point misses the grid's offset
    assert (integer - w).abs().max() > 1e-3
    # GPTQ on an exact grid makes no error to propagate: the same weights
    h = torch.eye(w.shape[1]) + 0.1
    torch.testing.assert_close(gptq_quantize(w, h, 4, 32, float_zero=True).dequantize(), w, rtol=0, atol=1e-6)


def test_float_zero_never_worse_than_integer_zero_on_random_weights():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    err_f = (rtn_quantize(w, 4, 64, float_zero=True).dequantize() - w).pow(2).mean()
    err_i = (rtn_quantize(w, 4, 64).dequantize() - w).pow(2).mean()
    assert err_f <= err_i


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_mixed_recipe_round_trips_and_stays_close(tmp_path, hf_llama, calib, method):
    model = copy.deepcopy(hf_llama)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    reference = _logits(hf_llama, ids)
    # the tiny model's MLP is 96 wide: group 32 by default, 64 for v_proj and for layer 1's o_proj
    sizes = {} if method == "awq" else {"self_attn.v_proj": 64, "1.self_attn.o_proj": 64}
    config = quantize_model(model, method, 4, 32, calib, progress=False,
                            float_zero=True, embedding_bits=8, group_sizes=sizes)  # fmt: skip
    assert config["zero"] == "float" and config["embedding_bits"] == 8
    table = model.model.embed_tokens.table
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and table.bits == 8
    layers = model.model.layers
    if sizes:
        assert layers[0].self_attn.v_proj.group_size == 64 and layers[0].self_attn.q_proj.group_size == 32
        assert layers[1].self_attn.o_proj.group_size == 64 and layers[0].self_attn.o_proj.group_size == 32
    assert layers[0].self_attn.q_proj.quantized_weight().zeros.is_floating_point()
    expected = _logits(model, ids)
    assert float((expected - reference).norm() / reference.norm()) < 0.15

    save_quantized(model, config, tmp_path / "out")
    skeleton = make_hf_model("llama", seed=7)  # other float weights: everything must come from disk
    rest = load_quantized_state(skeleton, load_file(tmp_path / "out" / "model.safetensors"), config)
    skeleton.load_state_dict(rest, strict=False)
    assert skeleton.model.embed_tokens.table.bits == 8
    torch.testing.assert_close(_logits(skeleton, ids), expected)


def test_float_zero_weights_repack_exactly_for_the_c_kernel(hf_llama):
    from slimlm.kernels.qweights import dequantize, from_quantized

    model = copy.deepcopy(hf_llama)
    quantize_model(model, "rtn", 4, 32, progress=False, float_zero=True, embedding_bits=8)
    linear = model.model.layers[0].mlp.gate_proj
    assert isinstance(linear, QuantLinear)
    qw = linear.quantized_weight()
    kw = from_quantized(qw)
    torch.testing.assert_close(dequantize(kw), qw.dequantize().float(), rtol=0, atol=1e-3)


def test_eight_bit_table_costs_more_bytes_than_four(hf_llama):
    four, eight = copy.deepcopy(hf_llama), copy.deepcopy(hf_llama)
    quantize_model(four, "rtn", 4, 32, progress=False)
    quantize_model(eight, "rtn", 4, 32, progress=False, embedding_bits=8)
    assert quantized_weight_bytes(eight) > quantized_weight_bytes(four)


def test_bad_group_sizes_are_refused(hf_llama):
    with pytest.raises(SlimlmError, match="no decoder layer has"):
        quantize_model(copy.deepcopy(hf_llama), "rtn", 4, 32, progress=False, group_sizes={"mlp.nope": 32})
    with pytest.raises(SlimlmError, match="unsupported group size"):
        quantize_model(copy.deepcopy(hf_llama), "rtn", 4, 32, progress=False, group_sizes={"mlp.up_proj": 48})
    with pytest.raises(SlimlmError, match="not awq"):
        quantize_model(copy.deepcopy(hf_llama), "awq", 4, 32, [torch.zeros(1, 8, dtype=torch.long)],
                       progress=False, group_sizes={"mlp.up_proj": 32})  # fmt: skip


def test_cli_rejects_a_malformed_group_sizes_flag(capsys):
    from slimlm.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "--group-sizes", "mlp.down_proj:32", "--out", "/tmp/never-written"])
    assert "is not NAME=GROUP" in capsys.readouterr().err
