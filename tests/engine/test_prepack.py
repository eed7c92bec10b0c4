"""oneDNN-prepacked linears (the engine's CPU default) give the outputs of the plain model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.models.prepack import PackedLinear, can_prepack, packed_bytes, prepack_linears
from tests.tiny_models import make_hf_model, slimlm_from_hf

pytestmark = pytest.mark.skipif(
    not can_prepack(nn.Linear(32, 16)), reason="this torch build has no oneDNN linear packing"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_linear_equals_f_linear(dtype, rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=True).to(dtype)
    x = torch.randn(2, rows, 96, dtype=dtype)
    packed = PackedLinear(linear.weight, linear.bias)
    torch.testing.assert_close(
        packed(x), F.linear(x, linear.weight, linear.bias)
    )  # summation order may differ


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2"])
def test_prepacked_model_gives_the_same_logits(arch):
    model = slimlm_from_hf(make_hf_model(arch))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.inference_mode():
        before = model.forward_dense(ids)
    swapped = prepack_linears(model)
    layers = model.config.num_hidden_layers
    assert swapped == 7 * layers + 1  # q, k, v, o, gate, up, down per layer, plus the lm_head
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, PackedLinear) and not hasattr(attn, "q_proj")
    assert isinstance(mlp.gate_up_proj, PackedLinear) and not hasattr(mlp, "gate_proj")
    with torch.inference_mode():
        after = model.forward_dense(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_tied_lm_head_is_left_alone_when_asked():
    model = slimlm_from_hf(make_hf_model("llama-tied"))
    prepack_linears(model, include_lm_head=False)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_engine_prepacks_by_default_with_identical_greedy_tokens_and_bytes(smollm):
    loaded = copy.copy(smollm)
    loaded.model = copy.deepcopy(smollm.model)  # the session model stays unpacked for other tests
    plain = LLM.from_loaded(smollm, kv_cache_tokens=1024)
    packed = LLM.from_loaded(loaded, prepack=True, kv_cache_tokens=1024)
    assert packed_bytes(loaded.model) > 0
    assert type(loaded.model.lm_head) is nn.Linear  # tied: packing it would copy the embedding
    assert packed.memory_report()["weights_bytes"] == plain.memory_report()["weights_bytes"]
    params = SamplingParams(max_tokens=24, temperature=0)
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3,"]
    assert [o.token_ids for o in packed.generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]


def test_quantized_linears_are_not_repacked():
    from slimlm.quant.linear import QuantLinear
    from slimlm.quant.quantize import quantize_model

    model = slimlm_from_hf(make_hf_model("llama")).to(torch.bfloat16)
    quantize_model(model, "rtn", 4, 32, progress=False)
    quantized = sum(isinstance(m, QuantLinear) for m in model.modules())
    prepack_linears(model)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == quantized
