"""Tiny random HF models per architecture: the reference implementations for parity tests."""

from __future__ import annotations

import torch

from slimlm.config import ModelConfig
from slimlm.models import build_model

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    rms_norm_eps=1e-5,
)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama-linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    "llama-dynamic": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
    ),
    "llama-llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "max_position_embeddings": 64,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 12}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}


def make_hf_model(arch: str, seed: int = 0):
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    hf_config = getattr(transformers, config_cls)(**{**BASE, **extra})
    if arch == "mistral":
        hf_config._attn_implementation = "eager"  # sdpa ignores the sliding window in some versions
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(hf_config).eval()
    return model


def slimlm_from_hf(hf_model, dtype=torch.float32):
    config = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    model = build_model(config, dtype)
    state = {k: v for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model
