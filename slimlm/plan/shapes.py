"""The parameter tensors of a Llama-shaped decoder, named as in HF checkpoints.

Everything the planner counts per tensor (quantized weight bytes, optimizer states with per-tensor rules,
LoRA adapters) starts from this list, so the per-parameter totals always agree with
`ModelConfig.num_parameters()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.config import ModelConfig

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj")  # fmt: skip  # the last two: Phi-3's fused projections
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


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
    if config.family == "phi3":  # stored fused, as in the checkpoint
        return {
            "qkv_proj": (q + 2 * kv, h),
            "o_proj": (h, q),
            "gate_up_proj": (2 * i, h),
            "down_proj": (h, i),
        }
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def fitting_group_size(config: ModelConfig) -> int:
    """`slimlm quantize`'s default group size: the largest of 128 / 64 / 32 dividing every decoder linear's
    input width and the hidden size (quant/quantize.py `group_sizes_that_fit`); -1 (per channel) if none."""
    widths = {k for _, k in linear_shapes(config).values()} | {config.hidden_size}
    return next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), -1)


def layer_params(config: ModelConfig, layer: int) -> list[ParamShape]:
    prefix = f"model.layers.{layer}."
    out = []
    for name, shape in linear_shapes(config).items():
        part = "self_attn" if name in _ATTENTION else "mlp"
        out.append(ParamShape(f"{prefix}{part}.{name}.weight", shape, "linear", layer))
        if config.attention_bias and name in ("q_proj", "k_proj", "v_proj"):
            out.append(ParamShape(f"{prefix}{part}.{name}.bias", (shape[0],), "bias", layer))
    if config.qk_norm:  # Qwen3, Gemma 3: one head_dim weight each
        for name in ("q_norm", "k_norm"):
            out.append(ParamShape(f"{prefix}self_attn.{name}.weight", (config.head_dim,), "norm", layer))
    h = config.hidden_size
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config.family == "gemma3":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for name in norms:
        out.append(ParamShape(f"{prefix}{name}.weight", (h,), "norm", layer))
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
