"""Quantized HF-style checkpoints (slimlm's own, AutoAWQ GEMM, GPTQ): QuantLinear modules swapped in
while the float skeleton is still on the meta device, so the float linear weights are never allocated."""

from __future__ import annotations

from pathlib import Path

import torch

from slimlm.config import ModelConfig
from slimlm.loading.safetensors_dir import iter_safetensors
from slimlm.loading.weights import fill_weights
from slimlm.models import MODEL_CLASSES


def load_quantized_dir(
    path: Path, config: ModelConfig, files: list[Path], dtype: torch.dtype, device, progress: bool
):
    from slimlm.quant.embedding import QuantEmbedding
    from slimlm.quant.format import load_quantized_state
    from slimlm.quant.linear import QuantLinear

    with torch.device("meta"):
        model = MODEL_CLASSES[config.family](config)
    state = dict(iter_safetensors(files))  # memory-mapped views, not copies
    rest = load_quantized_state(model, state, config.quantization, device=device)
    for module in model.modules():
        if not isinstance(module, QuantLinear | QuantEmbedding):  # those were built from the checkpoint
            module.to_empty(device=device, recurse=False)
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    for module in model.modules():  # QuantLinear biases and scales follow the compute dtype
        if isinstance(module, QuantLinear) and getattr(module, "bias", None) is not None:
            module.bias.data = module.bias.data.to(dtype)
        if isinstance(module, QuantEmbedding):  # looked-up rows come out in the compute dtype
            module.dtype = dtype
    model.init_buffers(device)
    if config.tie_word_embeddings and not isinstance(model.model.embed_tokens, QuantEmbedding):
        model.lm_head.weight = model.model.embed_tokens.weight
    quantized_params = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for p, _ in m.named_parameters()
    }
    fill_weights(
        model, rest.items(), len(rest), f"loading {path.name}", progress, already_loaded=quantized_params
    )
    return model.eval()
