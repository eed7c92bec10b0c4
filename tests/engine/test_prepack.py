"""oneDNN-prepacked linears (the engine's CPU default) give the outputs of the plain model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError
from slimlm.models.prepack import (
    PackedLinear,
    can_prepack,
    onednn_disabled,
    packed_bytes,
    prepare_linears,
)
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
    swapped = prepare_linears(model, "packed")
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
    prepare_linears(model, "packed", include_lm_head=False)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("layout", ["packed", "plain", "both"])
def test_every_layout_gives_identical_greedy_tokens(smollm, layout):
    loaded = copy.copy(smollm)
    loaded.model = copy.deepcopy(smollm.model)  # the session model stays as loaded for other tests
    plain = LLM.from_loaded(smollm, kv_cache_tokens=1024)
    packed = LLM.from_loaded(loaded, weights_layout=layout, kv_cache_tokens=1024)
    assert packed.memory_report()["weights_layout"] == layout
    assert (packed_bytes(loaded.model) > 0) == (layout != "plain")
    # Tied head: packing it would copy the embedding table, which only "both" (speed over memory) does.
    assert (type(loaded.model.lm_head) is nn.Linear) == (layout != "both")
    if layout != "both":
        assert packed.memory_report()["weights_bytes"] == plain.memory_report()["weights_bytes"]
    params = SamplingParams(max_tokens=24, temperature=0)
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3,"]
    expected = [o.token_ids for o in plain.generate(prompts, params)]
    assert [o.token_ids for o in packed.generate(prompts, params)] == expected  # batched steps
    assert [packed.generate(p, params)[0].token_ids for p in prompts] == expected  # one-row steps


def test_quantized_linears_are_not_repacked():
    from slimlm.quant.linear import QuantLinear
    from slimlm.quant.quantize import quantize_model

    model = slimlm_from_hf(make_hf_model("llama")).to(torch.bfloat16)
    quantize_model(model, "rtn", 4, 32, progress=False)
    quantized = sum(isinstance(m, QuantLinear) for m in model.modules())
    prepare_linears(model, "packed")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == quantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_plain_copy_serves_one_row_and_packed_serves_the_rest(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=True).to(dtype)
    both = PackedLinear(linear.weight, linear.bias, keep_plain=True)
    assert both.plain_weight is not None and "plain copy" in repr(both)
    for rows in (1, 5):
        x = torch.randn(rows, 96, dtype=dtype)
        with onednn_disabled():
            torch.testing.assert_close(both(x), F.linear(x, linear.weight, linear.bias))


def test_onednn_switch_is_restored_even_on_error():
    before = torch._C._get_mkldnn_enabled()
    with pytest.raises(RuntimeError), onednn_disabled():
        assert not torch._C._get_mkldnn_enabled()
        raise RuntimeError("boom")
    assert torch._C._get_mkldnn_enabled() == before


@pytest.mark.parametrize("layout", ["plain", "both"])
def test_layouts_fuse_and_keep_the_logits(layout):
    model = slimlm_from_hf(make_hf_model("qwen2"))  # q/k/v biases: the fused bias must follow
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.inference_mode():
        before = model.forward_dense(ids)
    prepare_linears(model, layout)
    attn = model.model.layers[0].self_attn
    assert not hasattr(attn, "q_proj")
    expected = nn.Linear if layout == "plain" else PackedLinear
    assert type(attn.qkv_proj) is expected and type(model.model.layers[0].mlp.gate_up_proj) is expected
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_dense(ids), before, rtol=1e-5, atol=1e-5)
        with onednn_disabled():  # the one-row path too
            torch.testing.assert_close(model.forward_dense(ids[:1, :1]), before[:1, :1], rtol=1e-5, atol=1e-5)


def test_both_layout_holds_the_linear_weights_and_the_tied_head_twice(smollm):
    loaded = copy.copy(smollm)
    loaded.model = copy.deepcopy(smollm.model)
    packed_model = copy.deepcopy(smollm.model)
    llm = LLM.from_loaded(loaded, weights_layout="both", kv_cache_tokens=64)
    head = loaded.model.lm_head
    assert isinstance(head, PackedLinear)
    assert (
        head.plain_weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    )  # shared, not copied
    prepare_linears(packed_model, "packed", include_lm_head=True)
    packed_copies = packed_bytes(packed_model)  # every linear and the head, packed once
    plain = LLM.from_loaded(smollm, kv_cache_tokens=64)
    # The shared table is counted once, though it is both a parameter and the head's plain weight.
    assert llm.memory_report()["weights_bytes"] == plain.memory_report()["weights_bytes"] + packed_copies


def test_one_token_steps_run_without_onednn_and_batched_steps_with_it(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=1024)
    seen, heads = [], []
    model = llm.loaded.model
    hooks = [
        model.register_forward_pre_hook(
            lambda m, args: seen.append((args[0].numel(), torch._C._get_mkldnn_enabled()))
        ),
        model.lm_head.register_forward_pre_hook(lambda m, args: heads.append(torch._C._get_mkldnn_enabled())),
    ]
    try:
        params = SamplingParams(max_tokens=3, temperature=0)
        llm.generate(["The capital of France is"], params)
        single, single_heads = list(seen), list(heads)
        seen.clear()
        heads.clear()
        llm.generate(["The capital of France is", "1, 2, 3,"], params)
    finally:
        for hook in hooks:
            hook.remove()
    assert single[0][1] and all(not enabled for _, enabled in single[1:])  # prefill, then 1-row decode
    assert single_heads and not any(single_heads)  # one sequence: its logits are one row, prefill too
    assert all(enabled for _, enabled in seen) and all(heads)  # two rows a step: oneDNN stays on
    assert torch._C._get_mkldnn_enabled()


def test_auto_layout_follows_the_number_of_sequences_and_bad_layouts_are_refused(smollm):
    from slimlm.engine.llm import auto_weights_layout

    assert (
        auto_weights_layout(1, torch.bfloat16) == "plain" and auto_weights_layout(1, torch.float16) == "plain"
    )
    assert auto_weights_layout(64, torch.bfloat16) == "packed"
    assert auto_weights_layout(1, torch.float32) == "packed"  # no fast fp32 GEMV: packed wins at one row too
    with pytest.raises(SlimlmError, match="unknown weights layout 'fast'; choose one of auto, packed"):
        LLM.from_loaded(smollm, weights_layout="fast", kv_cache_tokens=64)
    with pytest.raises(SlimlmError, match="unknown weights layout 'x'"):
        prepare_linears(nn.Linear(4, 4), "x")


def test_cli_hands_the_layout_to_the_engine_and_the_backend_resolves_auto(monkeypatch):
    """Commands no longer pick layouts: they fill EngineConfig, and slimlm.engine.backend lays out."""
    import argparse

    from slimlm.commands import common
    from slimlm.engine.backend import _lay_out
    from slimlm.engine.config import EngineConfig
    from tests.tiny_models import make_hf_model, slimlm_from_hf

    made = {}
    monkeypatch.setattr("slimlm.engine.llm.LLM", lambda **kw: made.update(kw))
    parser = argparse.ArgumentParser()
    common.add_model_args(parser)
    common.add_engine_args(parser)
    common.llm_from_args(parser.parse_args(["--dtype", "bfloat16"]), single_stream=True)
    config = made["engine_config"]
    assert config.weights_layout == "auto" and config.single_stream and "weights_layout" not in made
    common.llm_from_args(parser.parse_args(["--weights-layout", "both"]))
    assert made["engine_config"].weights_layout == "both" and not made["engine_config"].single_stream
    with pytest.raises(SlimlmError, match="unknown weights layout 'fastest'"):
        common.llm_from_args(parser.parse_args(["--weights-layout", "fastest"]))
    hf = make_hf_model("llama")
    for dtype, single, kernel, expected in [
        (torch.bfloat16, True, False, "plain"),  # one stream: torch's bf16 GEMV reads plain rows
        (torch.float32, True, False, "packed"),
        (torch.bfloat16, False, False, "packed"),  # batches on PyTorch: oneDNN
        (torch.bfloat16, False, True, "plain"),  # the C kernel reads plain rows at any batch
    ]:
        model = slimlm_from_hf(hf, dtype)
        assert _lay_out(model, EngineConfig(single_stream=single), kernel) == expected
