"""What each model family changes in the C decode kernel's step, decided in one place.

`family_params` reads the model's config and norms once and returns the values decode_cpu.c's
slim_layer / slim_model family fields take (model.h): q/k norms (Qwen3, Gemma 3), Gemma's norms around
attention and MLP outputs, its (1 + w) norm weights (folded into float32 copies here, so the kernel has
one RMSNorm), GeGLU, scaled embeddings, per-layer sliding windows and RoPE bases, final-logit
soft-capping. The kernel itself never names a family; a family the kernel cannot run is refused by
`unsupported` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimlm.config import ModelConfig

KERNEL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")
ACTS = {"silu": 0, "gelu_pytorch_tanh": 1}  # model.h's slim_model.act


@dataclass
class LayerParams:
    in_norm: torch.Tensor  # float32 [hidden], the weights as multiplied
    post_norm: torch.Tensor  # the norm before the MLP
    q_norm: torch.Tensor | None = None  # float32 [head_dim]
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # float32 [hidden]
    mlp_out_norm: torch.Tensor | None = None
    window: int = 0  # 0: full attention
    rope: int = 0  # index into FamilyParams.rotaries


@dataclass
class FamilyParams:
    layers: list[LayerParams]
    final_norm: torch.Tensor
    act: int
    embed_scale: float
    final_softcap: float
    rotaries: list[nn.Module]  # RotaryEmbedding modules, one cos/sin pair each per step


def unsupported(config: ModelConfig) -> str | None:
    """Why the kernel's step cannot compute this family's layers, or None."""
    if config.family not in KERNEL_FAMILIES:
        return f"the C decode kernel runs {', '.join(KERNEL_FAMILIES)} models, not {config.family}"
    if config.hidden_act not in ACTS:
        return f"the C decode kernel has no {config.hidden_act} activation"
    if config.attn_logit_softcapping:
        return "the C decode kernel does not soft-cap attention scores"
    return None


def _norm(module: nn.Module | None, plus_one: bool) -> torch.Tensor | None:
    """The float32 weights a norm multiplies by: w, or Gemma's 1 + w (computed in float32, as it does)."""
    if module is None:
        return None
    w = module.weight.detach().float()
    return (1.0 + w).contiguous() if plus_one else w.clone().contiguous()


def family_params(model: nn.Module) -> FamilyParams:
    """The kernel's per-layer and per-model family values for `model` (a models/ family class)."""
    cfg: ModelConfig = model.config
    gemma = cfg.family == "gemma3"
    layers = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        layers.append(
            LayerParams(
                in_norm=_norm(layer.input_layernorm, gemma),
                # Gemma's post_attention_layernorm norms the attention output; its MLP reads pre_feedforward
                post_norm=_norm(
                    layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm, gemma
                ),
                q_norm=_norm(getattr(attn, "q_norm", None), gemma),
                k_norm=_norm(getattr(attn, "k_norm", None), gemma),
                attn_out_norm=_norm(layer.post_attention_layernorm, True) if gemma else None,
                mlp_out_norm=_norm(layer.post_feedforward_layernorm, True) if gemma else None,
                window=cfg.layer_window(i) or 0,
                rope=1 if gemma and getattr(layer, "is_sliding", False) else 0,
            )
        )
    rotaries = [model.model.rotary_emb] + ([model.model.rotary_local] if gemma else [])
    # HF multiplies the bf16 embedding by sqrt(hidden) rounded to the weights' dtype.
    dtype = model.model.norm.weight.dtype
    embed_scale = float(torch.tensor(cfg.hidden_size**0.5, dtype=dtype)) if gemma else 1.0
    return FamilyParams(
        layers=layers,
        final_norm=_norm(model.model.norm, gemma),
        act=ACTS[cfg.hidden_act],
        embed_scale=embed_scale,
        final_softcap=float(cfg.final_logit_softcapping or 0.0),
        rotaries=rotaries,
    )
