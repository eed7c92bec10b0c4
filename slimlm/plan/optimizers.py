"""Optimizer state bytes per trainable tensor, from each optimizer's storage layout.

| optimizer          | per tensor of n elements, shape (r, c) for 2-D                                     |
|--------------------|------------------------------------------------------------------------------------|
| adamw              | m and v in the state dtype (fp32; the param dtype under pure bf16) + 4 B step      |
| adamw8bit          | m, v: 1 B codes per element + fp32 absmax per block of 256, both padded to whole     |
|                    | blocks (bitsandbytes >= 0.44; 2048 in the paper and older releases) + 4 B step     |
| adamw4bit          | m: 0.5 B per element + fp32 absmax per block of 128; v (>= 2-D): 0.5 B per element  |
|                    | + fp32 max vector per dim (r + c, rank-1 normalization); v (1-D): like m; + 4 B step |
| adamw4bit-factor   | m as adamw4bit; v (>= 2-D): fp32 row means (r) + column means (c); 1-D v as 4-bit  |
| sgd                | momentum buffer in the state dtype                                                 |

The low-bit optimizers keep both moments in fp32 for tensors of at most 4096 elements (slimlm.optim's
`fp32_state_max_numel`; bitsandbytes' min_8bit_size). These are the layouts of `slimlm.optim` (AdamW8bit,
AdamW4bit, AdamWFactor4bit) and torch.optim (AdamW, SGD).
"""

from __future__ import annotations

from slimlm.errors import SlimlmError

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit", "adamw4bit-factor", "sgd")
_ALIASES = {"adam": "adamw", "adamw32bit": "adamw", "adamw-8bit": "adamw8bit", "adamw-4bit": "adamw4bit",
            "adamw4bit_factor": "adamw4bit-factor", "factor": "adamw4bit-factor", "factor4bit": "adamw4bit-factor", "adamwfactor4bit": "adamw4bit-factor",
            "sgd-momentum": "sgd"}  # fmt: skip
FP32_STATE_MAX_NUMEL = 4096
BLOCK_8BIT = 256
BLOCK_4BIT = 128
STEP_BYTES = 4  # AdamW's float32 step counter, one per tensor
# slimlm.optim caches its code tables' lookup tensors once per process and device (measured with
# TensorMemoryTracker): the 8-bit dynamic maps index 2^16 float patterns, the 4-bit maps far fewer.
LOOKUP_TABLE_BYTES = {"adamw8bit": 497_644, "adamw4bit": 34_928, "adamw4bit-factor": 34_928}


def normalize_optimizer(name: str) -> str:
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        raise SlimlmError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    return key


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _blockwise(n: int, block: int, bits: int) -> int:
    padded = -(-n // block) * block
    return padded * bits // 8 + (padded // block) * 4


def tensor_state_bytes(shape: tuple[int, ...], optimizer: str, state_bytes: int = 4) -> int:
    """State bytes the optimizer keeps for one trainable tensor. `state_bytes`: element size of
    full-precision states (4 = fp32; 2 when pure-bf16 training keeps torch's states in the param dtype)."""
    opt = normalize_optimizer(optimizer)
    n = _numel(shape)
    if opt == "sgd":
        return n * state_bytes
    if opt == "adamw":
        return 2 * n * state_bytes + STEP_BYTES
    if n <= FP32_STATE_MAX_NUMEL:
        return 2 * n * 4 + STEP_BYTES
    if opt == "adamw8bit":
        return 2 * _blockwise(n, BLOCK_8BIT, 8) + STEP_BYTES
    m = _blockwise(n, BLOCK_4BIT, 4)
    if len(shape) < 2:
        return m + _blockwise(n, BLOCK_4BIT, 4) + STEP_BYTES
    if opt == "adamw4bit":
        v = (n + 1) // 2 + 4 * sum(shape)
    else:  # factored: row means over the last dim, column means over the second-to-last
        v = 4 * (_numel(shape[:-1]) + _numel(shape[:-2]) * shape[-1])
    return m + v + STEP_BYTES


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
