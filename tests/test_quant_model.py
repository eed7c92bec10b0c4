"""quantize_model end to end on tiny random models (HF Llama, slimlm's own), save/load, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quant.embedding import QuantEmbedding
from slimlm.quant.format import load_quantized_state, save_quantized
from slimlm.quant.linear import QuantLinear
from slimlm.quant.quantize import quantize_model, quantized_weight_bytes
from tests.tiny_models import make_hf_model, slimlm_from_hf

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_model("llama")  # hidden 64, intermediate 96, 4 heads / 2 kv heads, 2 layers


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 32), generator=g) for _ in range(2)]


def _logits(model, ids):
    with torch.no_grad():
        return model.forward_dense(ids) if hasattr(model, "forward_dense") else model(ids).logits


def _relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("embeddings", [True, False])
def test_quantize_tiny_hf_llama_end_to_end(hf_llama, calib, method, bits, embeddings):
    model = copy.deepcopy(hf_llama)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = _logits(hf_llama, ids)
    config = quantize_model(model, method, bits, 32, calib, progress=False, quantize_embeddings=embeddings)
    assert config["method"] == method and config["bits"] == bits and config["group_size"] == 32
    for layer in model.model.layers:
        swapped = {name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, QuantLinear)}
        assert swapped == set(LINEARS)
    if embeddings:  # RTN after the decoder (tests/test_quant_embeddings.py checks them in detail)
        assert isinstance(model.lm_head, QuantLinear) and isinstance(model.model.embed_tokens, QuantEmbedding)
    else:
        assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, hf_llama.lm_head.weight)
        assert torch.equal(model.model.embed_tokens.weight, hf_llama.model.embed_tokens.weight)
    err = _relative_error(_logits(model, ids), reference)
    assert err < (0.15 if bits == 4 else 0.02), err
    assert quantized_weight_bytes(model) < quantized_weight_bytes(hf_llama)


def test_calibrated_methods_do_not_lose_to_rtn_on_the_calibration_text(hf_llama, calib):
    ids = torch.cat(calib)
    reference = _logits(hf_llama, ids)
    errors = {}
    for method in ("rtn", "awq", "gptq"):
        model = copy.deepcopy(hf_llama)
        quantize_model(model, method, 4, 32, calib, progress=False)
        errors[method] = _relative_error(_logits(model, ids), reference)
    assert errors["gptq"] < errors["rtn"] and errors["awq"] <= errors["rtn"] * 1.05, errors


def test_quantize_slimlm_model_with_default_layer_capture(hf_llama, calib):
    model = slimlm_from_hf(hf_llama)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    reference = _logits(model, ids)
    # float embeddings: the error bound below is about the decoder layers that the default capture feeds
    quantize_model(model, "gptq", 4, 32, calib, progress=False, act_order=True, quantize_embeddings=False)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert _relative_error(_logits(model, ids), reference) < 0.15


@pytest.mark.parametrize("method,opts", [("rtn", {}), ("gptq", {"act_order": True}), ("awq", {})])
def test_save_and_load_round_trip(tmp_path, hf_llama, calib, method, opts):
    model = copy.deepcopy(hf_llama)
    config = quantize_model(model, method, 4, 32, calib, progress=False, **opts)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    expected = _logits(model, ids)
    save_quantized(model, config, tmp_path / "out")
    with pytest.raises(SlimlmError, match="already exists"):
        save_quantized(model, config, tmp_path / "out")  # never overwrites

    skeleton = make_hf_model("llama", seed=7)  # different float weights: everything must come from disk
    state = load_file(tmp_path / "out" / "model.safetensors")
    rest = load_quantized_state(skeleton, state, config)
    assert not any(k.endswith((".qweight", ".scales", ".zeros", ".perm")) for k in rest)
    missing, unexpected = skeleton.load_state_dict(rest, strict=False)
    quant_prefixes = tuple(n + "." for n, m in skeleton.named_modules() if isinstance(m, QuantLinear))
    assert not unexpected and all(k.startswith(quant_prefixes) for k in missing)
    torch.testing.assert_close(_logits(skeleton, ids), expected)


def test_saved_config_has_a_quantization_section(tmp_path, hf_llama):
    import json

    model = copy.deepcopy(hf_llama)
    config = quantize_model(model, "rtn", 8, -1, None, progress=False)
    save_quantized(model, config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"] == config and saved["hidden_size"] == 64
    assert saved["quantization_config"]["sym"] is True  # 8-bit defaults to the int8 kernel's scheme


def test_bad_input_raises(hf_llama, calib):
    model = copy.deepcopy(hf_llama)
    with pytest.raises(SlimlmError, match="unsupported bits 3"):
        quantize_model(model, "rtn", 3, 32, None, progress=False)
    with pytest.raises(SlimlmError, match="unsupported group size 48"):
        quantize_model(model, "rtn", 4, 48, None, progress=False)
    with pytest.raises(
        SlimlmError, match=r"does not divide the 96 input features of model\.layers\.0\.mlp\.down_proj"
    ):
        quantize_model(model, "rtn", 4, 64, None, progress=False)  # down_proj has 96 inputs
    with pytest.raises(SlimlmError, match="unknown quantization method"):
        quantize_model(model, "hqq", 4, 32, None, progress=False)
    for empty in (None, [], [torch.zeros(0, 8, dtype=torch.long)]):
        with pytest.raises(SlimlmError, match="needs calibration data"):
            quantize_model(model, "awq", 4, 32, empty, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # failures changed nothing
    quantize_model(model, "rtn", 4, 32, None, progress=False)
    with pytest.raises(SlimlmError, match="already quantized"):
        quantize_model(model, "gptq", 4, 32, calib, progress=False)
    with pytest.raises(SlimlmError, match="no decoder layers"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "rtn", 4, 32, None, progress=False)
