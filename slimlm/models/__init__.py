"""Model families. Each file holds one family; `build_model` picks by `config.family`."""

from __future__ import annotations

import torch

from slimlm.config import ModelConfig
from slimlm.models.llama import LlamaForCausalLM
from slimlm.models.mistral import MistralForCausalLM
from slimlm.models.qwen2 import Qwen2ForCausalLM
from slimlm.models.rope import RotaryEmbedding

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}


def build_model(
    config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> LlamaForCausalLM:
    """Build an uninitialised model on the meta device, then materialise empty storage on `device`.

    Weights are filled by the loader afterwards, so no random init is ever computed or held twice.
    """
    with torch.device("meta"):
        model = MODEL_CLASSES[config.family](config)
    model = model.to_empty(device=device).to(dtype)
    # Buffers are not loaded from checkpoints: recompute them on the real device.
    model.model.rotary_emb = RotaryEmbedding(config, device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


__all__ = ["MODEL_CLASSES", "build_model", "LlamaForCausalLM"]
