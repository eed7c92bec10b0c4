"""HF model directories: config.json, single or sharded safetensors (memory-mapped), generation_config.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from slimlm.config import read_json_file
from slimlm.errors import SlimlmError


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):  # not JSON, or not text at all
            raise SlimlmError(
                f"{index} is not a valid safetensors index (needs a 'weight_map' object)"
            ) from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SlimlmError(f"{path} is missing shard(s) listed in its index: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise SlimlmError(
            f"{path} holds only PyTorch pickle weights; slimlm loads safetensors (convert with save_pretrained(safe_serialization=True))"
        )
    raise SlimlmError(f"{path} has a config.json but no .safetensors weights")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one at a time from memory-mapped files."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise SlimlmError(f"{file} is truncated or corrupt ({e}); re-download or re-save it") from None


def count_tensors(files: list[Path]) -> int:
    from safetensors import SafetensorError, safe_open

    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                total += len(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise SlimlmError(f"{file} is truncated or corrupt ({e}); re-download or re-save it") from None
    return total


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def stored_float_dtypes(files: list[Path]) -> set[str]:
    """The safetensors dtypes ("BF16", "F32", ...) of the files' floating tensors, read from their headers
    without loading a tensor; empty when a file cannot be read (the loader then says why)."""
    from safetensors import SafetensorError, safe_open

    found: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                found |= {f.get_slice(name).get_dtype() for name in f.keys()}
        except (SafetensorError, OSError, ValueError):
            return set()
    return {d for d in found if d in FLOAT_DTYPES}


def read_generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    data = read_json_file(file)
    return data if isinstance(data, dict) else {}
