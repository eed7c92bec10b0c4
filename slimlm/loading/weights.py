"""Copy named tensors into a model built on empty storage, checking every parameter gets a value.

A "tensor" is a torch.Tensor (copied with `copy_`, converting dtype) or a lazy source with `.shape` and
`.copy_to(target)` (a GGUF tensor dequantizing itself block by block into the target).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.progress import progress_bar


def fill_weights(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor | Any]],
    total: int,
    label: str,
    progress: bool = True,
    already_loaded: set[str] = frozenset(),
) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model.config, "tie_word_embeddings", False)
    expected = {n for n in params if not (tied and n == "lm_head.weight")} - set(already_loaded)
    seen: set[str] = set()
    with progress_bar(label, total=total, enabled=progress) as advance:
        for name, tensor in tensors:
            advance()
            if name not in params:
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue
                raise SlimlmError(
                    f"checkpoint tensor {name!r} has no place in the {model.config.family} model; is the config right?"
                )
            target = params[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise SlimlmError(
                    f"checkpoint tensor {name} has shape {tuple(tensor.shape)} but the config implies {tuple(target.shape)}"
                )
            with torch.no_grad():
                if isinstance(tensor, torch.Tensor):
                    target.copy_(tensor)
                else:
                    tensor.copy_to(target)
            seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise SlimlmError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
