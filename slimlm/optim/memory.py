"""Exact memory of an optimizer's state, for any torch optimizer (ours, torch's, torchao's, bitsandbytes')."""

from __future__ import annotations

import torch


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in `optimizer.state`: moments, codes, block scales, step counters.

    Each storage is counted once (bitsandbytes shares one code table among all parameters), and tensor
    subclasses that wrap inner tensors (torchao's quantized states) are counted by their inner tensors.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            total += _tensor_bytes(value, seen)
    return total


def _tensor_bytes(value: object, seen: set[tuple[str, int]]) -> int:
    if not isinstance(value, torch.Tensor):
        return 0
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        inner_names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, name), seen) for name in inner_names)
    storage = value.untyped_storage()
    key = (str(value.device), storage.data_ptr())
    if storage.data_ptr() != 0 and key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()
