"""The one reading of a --device flag as a torch device (the engine's and the trainer's). The planner's
device is something else, a memory description (slimlm.plan.devices.describe_device)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    import torch


def torch_device(name: str | torch.device) -> torch.device:
    """'auto' -> cuda where available, else cpu; 'cpu', 'cuda', 'cuda:N'; one clear error otherwise."""
    import torch

    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SlimlmError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimlmError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


__all__ = ["torch_device"]
