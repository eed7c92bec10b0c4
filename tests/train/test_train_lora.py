"""LoRA layers over float and quantized projections, merging, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quant.linear import Int4TinyGemmLinear, make_quant_linear
from slimlm.quant.rtn import rtn_quantize
from slimlm.train.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    lora_state_dict,
    make_quantized_differentiable,
    merge_lora,
)
from slimlm.train.loss import CausalLMLoss
from slimlm.train.model_setup import enable_gradient_checkpointing
from tests.tiny_models import make_hf_model, slimlm_from_hf


def tiny_model():
    return slimlm_from_hf(make_hf_model("llama"))


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in lora_state_dict(model).items():
            if "lora_B" in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)


def test_fresh_adapter_is_identity_and_adds_b_a_scaled():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    layer = LoraLinear(base, LoraConfig(rank=4, alpha=8, dropout=0.0))
    torch.testing.assert_close(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    expected = F.linear(x, base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight, base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert not base.weight.requires_grad and layer.lora_A.weight.requires_grad


def test_apply_lora_targets_names_and_freezes_everything_else():
    model = tiny_model()
    names = apply_lora(model, LoraConfig(rank=4, target_modules=("q_proj", "v_proj")))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{ab}.weight" for n in names for ab in "AB")


def test_missing_target_and_too_large_rank_are_clear_errors():
    with pytest.raises(SlimlmError, match="qkv_proj do not exist.*choose from .*q_proj"):
        apply_lora(tiny_model(), LoraConfig(rank=4, target_modules=("q_proj", "qkv_proj")))
    # k_proj of the tiny model is 32 x 64: rank 33 does not fit
    with pytest.raises(SlimlmError, match="rank 33 is larger than .*k_proj.*at most 32"):
        apply_lora(tiny_model(), LoraConfig(rank=33, target_modules=("k_proj",)))


def test_quantized_base_gives_the_gradients_of_its_dequantized_float_weight():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    quant = make_quant_linear(rtn_quantize(w, 4, 32, False))
    assert isinstance(quant, Int4TinyGemmLinear)  # the kernel without an autograd formula
    reference = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        reference.weight.copy_(quant.dequantized_weight(torch.float32))
    assert make_quantized_differentiable(quant) == 1
    cfg = LoraConfig(rank=8, alpha=16)
    q_layer, f_layer = LoraLinear(quant, cfg), LoraLinear(reference, cfg)
    f_layer.load_state_dict(q_layer.state_dict(), strict=False)
    with torch.no_grad():
        for layer in (q_layer, f_layer):
            layer.lora_B.weight.copy_(torch.linspace(-1, 1, 64 * 8).view(64, 8))
    x = torch.randn(3, 7, 128)
    grads = []
    for layer in (q_layer, f_layer):
        xi = x.clone().requires_grad_(True)
        (layer(xi) ** 2).sum().backward()
        grads.append((xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    # the int4 kernel computes in bfloat16: compare at bf16 accuracy
    for q_grad, f_grad in zip(*grads, strict=True):
        torch.testing.assert_close(q_grad, f_grad, rtol=2e-2, atol=2e-2 * f_grad.abs().max().item())


@pytest.mark.parametrize("quantized", [False, True])
def test_merge_equals_the_adapted_model(quantized):
    model = tiny_model()
    if quantized:
        from slimlm.quant.quantize import quantize_model

        quantize_model(model, "rtn", 4, 32, progress=False)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    randomize_b(model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        adapted = model.forward_dense(ids)
        assert merge_lora(model) == 14
        merged = model.forward_dense(ids)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    tol = 3e-2 if quantized else 1e-5  # the int4 kernel runs in bf16, the merged model in fp32
    torch.testing.assert_close(merged, adapted, rtol=tol, atol=tol)


def test_gradient_checkpointing_keeps_loss_gradients_and_state_dict_keys():
    torch.manual_seed(0)
    ids, labels = torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12))
    results = []
    for checkpointing in (False, True):
        model = tiny_model()
        apply_lora(model, LoraConfig(rank=4, dropout=0.1))
        randomize_b(model)
        keys = list(model.state_dict())
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        torch.manual_seed(1)  # dropout masks: recomputation must replay the same ones
        loss, _ = CausalLMLoss(model)(ids, labels)
        loss.backward()
        assert list(model.state_dict()) == keys
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6)
