"""The parameter tensors of a Llama-shaped decoder, named as in HF checkpoints.

Everything the planner counts per tensor (quantized weight bytes, optimizer states with per-tensor rules,
LoRA adapters) starts from this list, so the per-parameter totals always agree with
`ModelConfig.num_parameters()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.config import ModelConfig

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ParamShape:
    name: str
    shape: tuple[int, ...]  # (out, in) for linear weights, like nn.Linear
    kind: str  # "linear" | "bias" | "norm" | "embedding" | "lm_head"
    layer: int | None = None  # decoder layer index, None for embeddings / final norm / lm_head

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection of one decoder layer."""
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def layer_params(config: ModelConfig, layer: int) -> list[ParamShape]:
    prefix = f"model.layers.{layer}."
    out = []
    for name, shape in linear_shapes(config).items():
        part = "self_attn" if name in LINEAR_NAMES[:4] else "mlp"
        out.append(ParamShape(f"{prefix}{part}.{name}.weight", shape, "linear", layer))
        if config.attention_bias and name in ("q_proj", "k_proj", "v_proj"):
            out.append(ParamShape(f"{prefix}{part}.{name}.bias", (shape[0],), "bias", layer))
    h = config.hidden_size
    out.append(ParamShape(f"{prefix}input_layernorm.weight", (h,), "norm", layer))
    out.append(ParamShape(f"{prefix}post_attention_layernorm.weight", (h,), "norm", layer))
    return out


def model_params(config: ModelConfig) -> list[ParamShape]:
    """Every parameter tensor once; a tied lm_head is the embedding and is not listed again."""
    h, v = config.hidden_size, config.vocab_size
    params = [ParamShape("model.embed_tokens.weight", (v, h), "embedding")]
    for layer in range(config.num_hidden_layers):
        params.extend(layer_params(config, layer))
    params.append(ParamShape("model.norm.weight", (h,), "norm"))
    if not config.tie_word_embeddings:
        params.append(ParamShape("lm_head.weight", (v, h), "lm_head"))
    return params
