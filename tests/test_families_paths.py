"""Qwen3, Phi-3 and Gemma 3 on every path besides plain inference: quantization (RTN/AWQ/GPTQ), the
int8 KV pool, the planner's exact bytes, LoRA with PEFT's adapter format, the C kernel's refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.loading import LoadedModel
from slimlm.plan.inference import kv_block_bytes, weight_bytes
from slimlm.quant.linear import QuantLinear
from slimlm.quant.quantize import decoder_layers, quantize_model
from tests.tiny_models import FAMILY_ARCHS, make_hf_model, slimlm_from_hf

pytest.importorskip("transformers")
FAMILIES = ["qwen3", "phi3", "gemma3"]
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def _calib() -> list[torch.Tensor]:
    return [torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(8))]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from slimlm.tokenizer import Tokenizer
    from tests.test_loading import _write_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    _write_tiny_tokenizer(path)
    return Tokenizer.from_hf_dir(path)


@pytest.mark.parametrize(
    "arch,method",
    [("qwen3", "rtn"), ("phi3", "rtn"), ("gemma3", "rtn"), ("phi3", "awq"), ("gemma3", "awq"),
     ("phi3", "gptq"), ("gemma3", "gptq")],
)  # fmt: skip
def test_quantizers_find_every_projection_and_keep_the_function(arch, method):
    """8-bit: every decoder linear (Phi-3's fused ones too) becomes a QuantLinear and the logits stay
    close to the float model's, which a scale folded into the wrong norm would break (Gemma's MLP reads
    pre_feedforward_layernorm, not post_attention_layernorm)."""
    model = slimlm_from_hf(make_hf_model(arch))
    linears = sum(type(m) is nn.Linear for layer in decoder_layers(model) for m in layer.modules())
    with torch.no_grad():
        ref = model.forward_dense(IDS)
    quantize_model(model, method, 8, 32, _calib(), progress=False, quantize_embeddings=False)
    quantized = sum(isinstance(m, QuantLinear) for layer in decoder_layers(model) for m in layer.modules())
    assert quantized == linears == (4 if arch == "phi3" else 7) * model.config.num_hidden_layers
    with torch.no_grad():
        out = model.forward_dense(IDS)
    # 8-bit codes (bf16 kernels) err by a few percent of the largest logit; a misplaced fold, by ~100%
    assert (out - ref).abs().max() < 0.1 * ref.abs().max(), (out - ref).abs().max()


def test_awq_fold_into_gemma_norm_keeps_the_float_layer():
    """Gemma's norm multiplies by (1 + w): folding 1/s into it must scale its output by exactly 1/s."""
    from slimlm.quant.awq import fold_scale

    model = slimlm_from_hf(make_hf_model("gemma3"))
    layer = model.model.layers[0]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = layer.mlp(layer.pre_feedforward_layernorm(x))
        scale = torch.rand(64, generator=torch.Generator().manual_seed(10)) + 0.5
        fold_scale(layer.pre_feedforward_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], scale)
        out = layer.mlp(layer.pre_feedforward_layernorm(x))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
def test_int8_kv_engine_stays_close_to_the_float_model(arch, tokenizer):
    """The int8 pool (paged, blocks of 4) under each family: the first token's log-probability stays
    within a few hundredths of the float model's, and the pool is the planner's bytes."""
    model = slimlm_from_hf(make_hf_model(arch))
    prompt = IDS[0, :20].tolist()
    with torch.no_grad():
        ref = torch.log_softmax(model.forward_dense(torch.tensor([prompt]))[0, -1], -1)
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=1)
    for kv in ("fp32", "int8"):
        loaded = LoadedModel(model, model.config, tokenizer)
        llm = LLM.from_loaded(loaded, kv_cache_tokens=128, block_size=4, kv_dtype=kv)
        out = llm.generate([prompt], params)[0]
        report = llm.memory_report()
        assert report["kv_pool_bytes"] == report["kv_blocks"] * kv_block_bytes(model.config, kv, 4)
        assert out.token_ids[0] == int(ref.argmax()), kv
        assert abs(out.logprobs[0].logprob - float(ref.max())) < (1e-4 if kv == "fp32" else 0.05), kv


@pytest.mark.parametrize("arch", FAMILIES + ["gemma3-plain"])
def test_planner_weight_bytes_equal_the_built_model(arch):
    model = slimlm_from_hf(make_hf_model(arch))
    params = {id(p): p for p in model.parameters()}.values()
    assert weight_bytes(model.config, "fp32") == sum(p.numel() * p.element_size() for p in params)
    assert model.config.num_parameters() == sum(p.numel() for p in params)


@pytest.mark.parametrize("arch", FAMILIES)
def test_lora_adapter_loads_in_peft_and_matches(tmp_path, arch):
    """Default targets find each family's projections (Phi-3: qkv_proj, gate_up_proj); the adapter
    written in PEFT's format gives HF + PEFT the same logits as slimlm."""
    peft = pytest.importorskip("peft")
    from slimlm.train.lora import LoraConfig, apply_lora, lora_modules
    from slimlm.train.peft_format import save_peft_adapter

    hf = make_hf_model(arch)
    model = slimlm_from_hf(hf)
    wrapped = apply_lora(model, LoraConfig(rank=4, alpha=8))
    leaves = {n.rsplit(".", 1)[-1] for n in wrapped}
    expected = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if arch == "phi3" else {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # fmt: skip
    assert leaves == expected
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(11))
    save_peft_adapter(model, LoraConfig(rank=4, alpha=8), tmp_path / "adapter", base_model=None)
    with torch.no_grad():
        base = hf(IDS).logits
        peft_logits = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(IDS).logits
        ours = model.forward_dense(IDS)
    assert (peft_logits - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, peft_logits, rtol=1e-4, atol=1e-4)


def test_c_decode_kernel_refuses_attention_soft_capping_with_a_reason():
    """The families run on the C kernel (tests/engine/test_decode_kernel_families.py); attention-score
    soft-capping (no released Gemma 3 uses it) is the one setting it refuses, naming it."""
    from slimlm.kernels.fused_decode import _why_not
    from slimlm.kv.paged import PagedKVCache

    model = slimlm_from_hf(make_hf_model("gemma3"), dtype=torch.bfloat16)
    model.config.attn_logit_softcapping = 50.0
    cache = PagedKVCache(model.config, 8, 4, torch.bfloat16)
    assert _why_not(model, cache) == "the C decode kernel does not soft-cap attention scores"


def test_new_families_are_listed():
    assert set(FAMILY_ARCHS) >= {"qwen3", "phi3", "gemma3"}


@pytest.mark.parametrize("arch", ["phi3", "gemma3"])
def test_quantized_checkpoint_round_trips_through_load(tmp_path, arch):
    """w4 (embedding and tied head quantized too) saved with its config.json, loaded back by `load`:
    the family's config keys survive `to_hf_dict` and the logits are the quantized model's."""
    from slimlm.loading import load
    from slimlm.quant.format import save_quantized
    from tests.test_loading import _write_tiny_tokenizer

    model = slimlm_from_hf(make_hf_model(arch))
    config = quantize_model(model, "rtn", 4, 32, None, progress=False)
    save_quantized(model, config, tmp_path / "q")
    _write_tiny_tokenizer(tmp_path / "q")
    loaded = load(str(tmp_path / "q"), dtype="float32", progress=False)
    assert loaded.config.family == arch and loaded.config.layer_types == model.config.layer_types
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.forward_dense(IDS), model.forward_dense(IDS))
