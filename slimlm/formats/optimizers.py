"""Optimizer names and their state layouts, torch-free: the optimizers (slimlm.optim's codecs) allocate
their states from these layouts and the planner (slimlm.plan.optimizers) counts the same layouts' bytes.

| optimizer   | per tensor of n elements, shape (r, c) for 2-D                                             |
|-------------|--------------------------------------------------------------------------------------------|
| adamw       | m and v in the state dtype (fp32; the param dtype under pure bf16) + 4 B step (torch)     |
| adamw8bit   | m, v: 1 B codes per element + fp32 absmax per block of 256, padded to whole blocks + step |
| adamw4bit   | m: 0.5 B per element + fp32 absmax per block of 128; v (>= 2-D): 0.5 B per element + an    |
|             | fp32 max vector per dim (rank-1 normalization); v (1-D): like m; + step                    |
| factor4bit  | m as adamw4bit; v (>= 2-D): fp32 row means + column means; 1-D v as 4-bit; + step          |
| sgd         | momentum buffer in the state dtype (torch; planner only)                                   |

Tensors of at most FP32_STATE_MAX_NUMEL elements keep both moments in fp32 (bitsandbytes' min_8bit_size).
"""

from __future__ import annotations

from math import prod

from slimlm.errors import SlimlmError

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit", "factor4bit")  # slimlm train --optim
PLANNER_OPTIMIZERS = (*OPTIMIZERS, "sgd")
ALIASES = {"adam": "adamw", "adamw32bit": "adamw", "adamw-8bit": "adamw8bit", "adamw-4bit": "adamw4bit",
           "factor": "factor4bit", "adamwfactor4bit": "factor4bit", "adamw4bit-factor": "factor4bit",
           "adamw4bit_factor": "factor4bit", "sgd-momentum": "sgd"}  # fmt: skip
FP32_STATE_MAX_NUMEL = 4096
BLOCK_8BIT = 256
BLOCK_4BIT = 128
STEP_BYTES = 4  # AdamW's float32 step counter, one per tensor
DTYPE_BYTES = {"float32": 4, "uint8": 1}

StateLayout = dict[str, tuple[tuple[int, ...], str]]  # state key -> (shape, dtype name)


def optimizer_name(name: str, planner: bool = False) -> str:
    """'adamw4bit-factor' -> 'factor4bit'; one of OPTIMIZERS (PLANNER_OPTIMIZERS) or one clear error."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    allowed = PLANNER_OPTIMIZERS if planner else OPTIMIZERS
    if key not in allowed:
        raise SlimlmError(f"unknown optimizer {name!r}; use one of {', '.join(allowed)}")
    return key


def padded_length(numel: int, multiple: int) -> int:
    return -(-numel // multiple) * multiple


def float32_layout(prefix: str, shape: tuple[int, ...]) -> StateLayout:
    return {prefix: (tuple(shape), "float32")}


def blockwise_layout(prefix: str, numel: int, block_size: int, packed: bool) -> StateLayout:
    """Codes (two a byte when `packed`) of blocks of `block_size` elements, zero-padded, + fp32 absmax."""
    padded = padded_length(numel, block_size)
    return {
        f"{prefix}_codes": ((padded // 2 if packed else padded,), "uint8"),
        f"{prefix}_absmax": ((padded // block_size,), "float32"),
    }


def rank1_layout(prefix: str, shape: tuple[int, ...]) -> StateLayout:
    """4-bit codes (two a byte, padded to even length) + an fp32 max vector per dim."""
    out: StateLayout = {f"{prefix}_codes": ((padded_length(prod(shape), 2) // 2,), "uint8")}
    for d, size in enumerate(shape):
        out[f"{prefix}_max{d}"] = ((size,), "float32")
    return out


def factored_layout(prefix: str, shape: tuple[int, ...]) -> StateLayout:
    """Adafactor's running means over the last dim (row) and the second-to-last (col), fp32."""
    shape = tuple(shape)
    return {f"{prefix}_row": (shape[:-1], "float32"), f"{prefix}_col": (shape[:-2] + shape[-1:], "float32")}


def moment_layouts(optimizer: str, shape: tuple[int, ...]) -> StateLayout:
    """The low-bit AdamWs' states of one tensor (both moments), as slimlm.optim.variants allocates them."""
    opt = optimizer_name(optimizer)
    if prod(shape) <= FP32_STATE_MAX_NUMEL:
        return {**float32_layout("exp_avg", shape), **float32_layout("exp_avg_sq", shape)}
    if opt == "adamw8bit":
        return {**blockwise_layout("exp_avg", prod(shape), BLOCK_8BIT, False),
                **blockwise_layout("exp_avg_sq", prod(shape), BLOCK_8BIT, False)}  # fmt: skip
    m = blockwise_layout("exp_avg", prod(shape), BLOCK_4BIT, True)
    if len(shape) < 2:
        return {**m, **blockwise_layout("exp_avg_sq", prod(shape), BLOCK_4BIT, True)}
    if opt == "adamw4bit":
        return {**m, **rank1_layout("exp_avg_sq", shape)}
    return {**m, **factored_layout("exp_avg_sq", shape)}


def layout_bytes(layout: StateLayout) -> int:
    return sum(prod(shape) * DTYPE_BYTES[dtype] for shape, dtype in layout.values())


def tensor_state_bytes(shape: tuple[int, ...], optimizer: str, state_bytes: int = 4) -> int:
    """State bytes the optimizer keeps for one trainable tensor. `state_bytes`: element size of torch's
    full-precision states (4 = fp32; 2 when pure-bf16 training keeps them in the param dtype)."""
    opt = optimizer_name(optimizer, planner=True)
    n = prod(shape)
    if opt == "sgd":
        return n * state_bytes
    if opt == "adamw":
        return 2 * n * state_bytes + STEP_BYTES
    return layout_bytes(moment_layouts(opt, shape)) + STEP_BYTES


__all__ = ["OPTIMIZERS", "PLANNER_OPTIMIZERS", "StateLayout", "blockwise_layout", "factored_layout",
           "float32_layout", "layout_bytes", "moment_layouts", "optimizer_name", "rank1_layout",
           "tensor_state_bytes"]  # fmt: skip
