"""Turn a loaded model into the one a run trains: device, precision, 4-bit base, LoRA, checkpointing.

Precision "bf16-mixed" is autocast to bfloat16 with float32 master weights: every trainable parameter
(all of them in full fine-tuning, the adapters in LoRA) stays float32 and the optimizer updates it in
float32, while matmuls run in bfloat16. Frozen base weights of LoRA are stored in bfloat16 to halve them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slimlm.devices import torch_device
from slimlm.errors import SlimlmError
from slimlm.train.config import TrainConfig
from slimlm.train.lora import LoraConfig, apply_lora, is_quantized

QLORA_GROUP_SIZES = (128, 64, 32)


@dataclass
class PreparedModel:
    loaded: Any  # slimlm.loading.LoadedModel (config, tokenizer, source)
    model: nn.Module
    lora: LoraConfig | None
    lora_modules: list[str]
    base_quantization: dict | None  # the QLoRA base's quantization section, if quantized here
    autocast_dtype: torch.dtype | None

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def rank_device(name: str, local_rank: int = 0) -> torch.device:
    """--device read as everywhere (slimlm.devices), then a bare 'cuda' is this process's rank's GPU."""
    device = torch_device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise SlimlmError(f"training supports cpu and cuda devices, got {name!r}")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SlimlmError("this GPU has no bfloat16 support; use --precision fp32")
        return precision
    # bf16 matmuls are fast on recent GPUs; on most CPUs they are slower than fp32.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "fp32"


def qlora_group_size(model_config, requested: int | None) -> int:
    widths = {model_config.hidden_size, model_config.intermediate_size, model_config.q_size}
    if requested is not None:
        bad = sorted(w for w in widths if w % requested)
        if bad:
            raise SlimlmError(f"--qlora-group-size {requested} does not divide the projection width(s) {bad}")
        return requested
    for size in QLORA_GROUP_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise SlimlmError(
        f"no 4-bit group size of {QLORA_GROUP_SIZES} divides this model's widths {sorted(widths)}"
    )


def load_base(cfg: TrainConfig, device: torch.device, progress: bool):
    from slimlm.loading import load

    return load(cfg.model, dtype="float32", device=device, progress=progress)


def prepare_model(cfg: TrainConfig, loaded, precision: str) -> PreparedModel:
    """Quantize (QLoRA), cast, add LoRA and checkpointing to `loaded.model`, in place. Seeds nothing."""
    model = loaded.model
    already_quantized = any(is_quantized(m) for m in model.modules())
    if cfg.method == "full" and already_quantized:
        raise SlimlmError(
            "cannot fully fine-tune a quantized checkpoint; use --method lora on it, or the float model"
        )
    base_quantization = None
    if cfg.method == "qlora" and not already_quantized:
        from slimlm.quant.quantize import quantize_model

        group = qlora_group_size(loaded.config, cfg.qlora_group_size)
        # QLoRA quantizes the frozen projections only; the embedding and lm_head stay float
        base_quantization = quantize_model(model, "rtn", 4, group, progress=False, quantize_embeddings=False)
    mixed = precision == "bf16-mixed"
    if cfg.method != "full" and mixed:
        model.to(torch.bfloat16)  # frozen base only; quantized buffers are integer-typed and stay
    lora, names = None, []
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        lora = LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        names = apply_lora(model, lora)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return PreparedModel(loaded, model, lora, names, base_quantization, torch.bfloat16 if mixed else None)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SlimlmError("gradient checkpointing needs the decoder layers at model.model.layers")
    return layers


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations.

    The layer's own forward is replaced on the instance (parameter names and the module tree stay
    unchanged, so state dicts and adapters keep their keys); without grad it runs as before.
    """
    for layer in decoder_layers(model):
        if "forward" in vars(layer):
            continue  # already enabled

        def forward(*args, _original=layer.forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        layer.forward = forward


def disable_gradient_checkpointing(model: nn.Module) -> None:
    for layer in decoder_layers(model):
        vars(layer).pop("forward", None)


__all__ = [
    "PreparedModel",
    "disable_gradient_checkpointing",
    "enable_gradient_checkpointing",
    "load_base",
    "prepare_model",
    "qlora_group_size",
    "rank_device",
    "resolve_precision",
]
