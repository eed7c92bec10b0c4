"""Dtype names: the float dtypes' short names and aliases, and the KV cache's storage names (--kv-dtype).

One table for the loader (`--dtype`), the KV pools, EngineConfig and the planner; torch-free, so the
loader maps the short names to torch dtypes itself (`TORCH_NAMES`).
"""

from __future__ import annotations

from slimlm.errors import SlimlmError

FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short name -> torch.<name>
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
# --kv-dtype: "auto" stores KV in the compute dtype; the quantized ones are slimlm.formats.kv's table
KV_DTYPES = ("auto", "fp32", "bf16", "fp16", "int8", "int4", "k8v4")


def float_dtype_name(name: object) -> str:
    """'float32' / 'torch.bfloat16' / 'fp16' -> 'fp32' / 'bf16' / 'fp16'."""
    key = str(name).removeprefix("torch.").lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in FLOAT_BYTES:
        raise SlimlmError(f"unknown dtype {name!r}; use fp32, bf16 or fp16")
    return key


def kv_dtype_name(name: object, allow_auto: bool = True) -> str:
    """The one check of a --kv-dtype value: its canonical name ('bfloat16' -> 'bf16'), or one clear error."""
    key = str(name).removeprefix("torch.").lower()
    key = DTYPE_ALIASES.get(key, key) if key != "float" else key
    allowed = KV_DTYPES if allow_auto else KV_DTYPES[1:]
    if key not in allowed:
        raise SlimlmError(f"unknown KV dtype {name!r}; choose one of {', '.join(allowed)}")
    return key


__all__ = ["DTYPE_ALIASES", "FLOAT_BYTES", "KV_DTYPES", "TORCH_NAMES", "float_dtype_name", "kv_dtype_name"]
