"""Optimizer state bytes per trainable tensor: the layouts in slimlm.formats.optimizers, which slimlm.optim's
codecs allocate from (the table of layouts is there), and torch.optim's AdamW and SGD."""

from __future__ import annotations

from slimlm.formats.optimizers import (
    BLOCK_4BIT,
    BLOCK_8BIT,
    FP32_STATE_MAX_NUMEL,
    PLANNER_OPTIMIZERS,
    STEP_BYTES,
    optimizer_name,
    tensor_state_bytes,
)

OPTIMIZERS = PLANNER_OPTIMIZERS
# slimlm.optim caches its code tables' lookup tensors once per process and device (measured with
# TensorMemoryTracker): the 8-bit dynamic maps index 2^16 float patterns, the 4-bit maps far fewer.
LOOKUP_TABLE_BYTES = {"adamw8bit": 497_644, "adamw4bit": 34_928, "factor4bit": 34_928}


def normalize_optimizer(name: str) -> str:
    """slimlm train's spelling of an optimizer (old planner names such as adamw4bit-factor accepted)."""
    return optimizer_name(name, planner=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def optimizer_state_bytes(shapes: list[tuple[int, ...]], optimizer: str, state_bytes: int = 4) -> int:
    return sum(tensor_state_bytes(s, optimizer, state_bytes) for s in shapes)


def step_workspace_bytes(shapes: list[tuple[int, ...]], optimizer: str, state_bytes: int, param_bytes: int,
                         foreach: bool) -> int:  # fmt: skip
    """Temporaries of one optimizer step (estimate, from the update's code).

    torch AdamW, one tensor at a time: `exp_avg_sq.sqrt() / bias_correction` holds two tensors of the
    largest parameter in the state dtype; with foreach (torch's default on CUDA), one sqrt per parameter
    of the whole list at once. slimlm's low-bit AdamWs work one tensor at a time in fp32: decoding,
    updating and re-encoding the moments peaks at 6.5 fp32 copies of the largest tensor (measured with
    `TensorMemoryTracker` on slimlm.optim), plus fp32 copies of the parameter and its gradient when
    those are not fp32. SGD with momentum updates in place.
    """
    opt = normalize_optimizer(optimizer)
    if not shapes or opt == "sgd":
        return 0
    largest = max(_numel(s) for s in shapes)
    if opt == "adamw":
        if foreach:
            return sum(_numel(s) for s in shapes) * state_bytes
        return 2 * largest * state_bytes
    half_copies = 13 + (4 if param_bytes != 4 else 0)  # in units of half an fp32 copy
    return half_copies * largest * 2


__all__ = ["BLOCK_4BIT", "BLOCK_8BIT", "FP32_STATE_MAX_NUMEL", "LOOKUP_TABLE_BYTES", "OPTIMIZERS", "STEP_BYTES",
           "normalize_optimizer", "optimizer_state_bytes", "step_workspace_bytes", "tensor_state_bytes"]  # fmt: skip
