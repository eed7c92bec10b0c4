"""The optimizer (torch AdamW or slimlm's low-bit AdamW) and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, state_device: str | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay only on matrices (not norms or biases).

    `state_device`: keep the low-bit states there (CPU offload) while the parameters live elsewhere.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    from slimlm.optim import AdamW4bit, AdamW8bit, AdamWFactor4bit

    cls = {"adamw8bit": AdamW8bit, "adamw4bit": AdamW4bit, "factor4bit": AdamWFactor4bit}[name]
    return cls(groups, lr=lr, state_device=state_device)


class WarmupDecay:
    """lr multiplier: linear warmup from 0 over `warmup` steps, then cosine / linear decay or constant.

    A callable object (not a lambda) so LambdaLR's state_dict saves it and a resume restores it.
    """

    def __init__(self, warmup: int, total: int, kind: str, min_ratio: float) -> None:
        self.warmup, self.total, self.kind, self.min_ratio = warmup, total, kind, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int | None, warmup_ratio: float,
    kind: str, min_ratio: float,
) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    warmup = warmup_steps if warmup_steps is not None else int(total_steps * warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(warmup, total_steps, kind, min_ratio))


__all__ = ["WarmupDecay", "build_optimizer", "build_scheduler"]
