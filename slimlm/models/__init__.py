"""Model families. Each file holds one family; `build_model` picks by `config.family`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from slimlm.config import ModelConfig
from slimlm.models.gemma3 import Gemma3ForCausalLM
from slimlm.models.llama import LlamaForCausalLM
from slimlm.models.mistral import MistralForCausalLM
from slimlm.models.phi3 import Phi3ForCausalLM
from slimlm.models.qwen2 import Qwen2ForCausalLM
from slimlm.models.qwen3 import Qwen3ForCausalLM

# One entry per family (config.FAMILIES); each class keeps HF's parameter names.
MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def build_model(
    config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> LlamaForCausalLM:
    """Build an uninitialised model on the meta device, then materialise empty `dtype` storage on `device`.

    The storage is allocated once, directly in the target dtype (no float32 storage converted afterwards),
    and left untouched until the loader writes the weights into it, so no random init is ever computed
    and no weight is ever held twice.
    """
    model = meta_model(config)
    materialize_empty(model, dtype, device)
    # Buffers are not loaded from checkpoints: recompute them on the real device.
    model.init_buffers(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def meta_model(config: ModelConfig) -> LlamaForCausalLM:
    """The model's skeleton on the meta device: no storage, no random init (see `_no_param_init`).
    Loaders swap real modules into it (quantized, C kernel layout), then `materialize_empty` the rest."""
    with torch.device("meta"), _no_param_init():
        return MODEL_CLASSES[config.family](config)


def materialize_empty(model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str) -> None:
    """Replace every meta parameter/buffer by uninitialised storage on `device`, floating ones in `dtype`;
    tensors that are already real (modules a loader swapped in) are left as they are.

    `model.to(dtype).to_empty(device)` does the same, but its meta `empty_like` goes through torch._refs
    and imports sympy (~0.5 s). Tied parameters stay tied (one new tensor per meta tensor).
    """
    new: dict[int, torch.Tensor] = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in new:
            kind = dtype if t.is_floating_point() else t.dtype
            data = torch.empty(t.shape, dtype=kind, device=device)
            new[id(t)] = (
                torch.nn.Parameter(data, t.requires_grad) if isinstance(t, torch.nn.Parameter) else data
            )
        return new[id(t)]

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and t.is_meta:
                    table[name] = empty(t)


# torch.nn.init functions the layers' reset_parameters() call (nn.Linear, nn.Embedding, ...)
_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
)


@contextlib.contextmanager
def _no_param_init() -> Iterator[None]:
    """Skip random init while building on the meta device (the loader overwrites every value anyway).

    It computes nothing on meta tensors, but torch routes meta `normal_` through torch._refs, whose first
    call imports torch._dynamo and sympy: ~1.5 s and ~70 MiB of modules, for a load that never compiles.
    (transformers' `no_init_weights` does the same.)
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    for name in saved:
        setattr(torch.nn.init, name, _keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


__all__ = ["MODEL_CLASSES", "build_model", "LlamaForCausalLM"]
