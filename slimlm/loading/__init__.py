"""Load a model (HF directory, GGUF file or the embedded default) into slimlm's model classes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimlm.config import ModelConfig
from slimlm.errors import SlimlmError
from slimlm.heap import release_free_heap
from slimlm.loading.default_model import DEFAULT_ALIAS, default_model_path, resolve_model_path
from slimlm.loading.weights import fill_weights
from slimlm.models import build_model

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Any
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what loading changed, for the memory report


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise SlimlmError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise SlimlmError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def load(
    model: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    weights: str = "float",
    quantized_layout: str = "torch",
) -> LoadedModel:
    """Load weights, config and tokenizer. `model`: HF dir, .gguf file, alias, or None (embedded default).
    `weights` "native" runs a GGUF's Q4_0/Q4_1/Q4_K/Q5_0/Q8_0 blocks as they are (slimlm.loading.gguf_native);
    "float" (default) dequantizes them to `dtype`. Quantized HF checkpoints load quantized either way, as
    PyTorch's QuantLinear modules (`quantized_layout` "torch": training, QLoRA) or straight into the C
    kernel's layout ("kernel": one copy; the engine asks for it, slimlm.engine.backend.quantized_layout)."""
    import time

    start = time.perf_counter()
    from slimlm.loading.gguf_native import check_weights_choice, load_gguf_native

    check_weights_choice(weights)
    if quantized_layout not in ("torch", "kernel"):
        raise SlimlmError(f"unknown quantized_layout {quantized_layout!r}; choose torch or kernel")
    torch_dtype = parse_dtype(dtype)
    path = resolve_model_path(model)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SlimlmError(f"{path} is not a .gguf file; pass a GGUF file or an HF model directory")
        native = weights == "native"
        loaded = (load_gguf_native if native else _load_gguf)(path, torch_dtype, device, progress)
    elif path.is_dir():
        from slimlm.output_dir import incomplete_output_error

        if (error := incomplete_output_error(path)) is not None:
            raise error
        loaded = _load_hf_dir(path, torch_dtype, device, progress, quantized_layout)
    else:
        raise SlimlmError(f"{path} is neither a file nor a directory")
    loaded.load_seconds = time.perf_counter() - start
    release_free_heap()  # the loader's temporaries (metadata, tokenizer build, conversions): slimlm/heap.py
    return loaded


def load_config(model: str | None) -> ModelConfig:
    """Only the config (no weights): for planning and start-up reports."""
    path = resolve_model_path(model)
    if path.is_file():
        from slimlm.loading.gguf_file import GGUFFile, config_from_gguf

        with GGUFFile(path) as file:
            meta = file.metadata
            vocab = len(meta.get("tokenizer.ggml.tokens") or []) or None
            return config_from_gguf(meta, {t.name for t in file.tensors}, vocab)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelConfig.from_json_file(path / "config.json")
    if path.suffix == ".json" and path.is_file():
        return ModelConfig.from_json_file(path)
    raise SlimlmError(f"{path} is not a model: expected an HF directory with config.json or a .gguf file")


def _load_gguf(path: Path, dtype: torch.dtype, device, progress: bool) -> LoadedModel:
    from slimlm.loading.gguf_file import GGUFFile, config_and_tokenizer, gguf_weights

    with GGUFFile(path) as file:
        config, tokenizer = config_and_tokenizer(file)
        config.torch_dtype = str(dtype).removeprefix("torch.")
        file.drop_metadata()  # the vocabulary and merges as Python strings: not needed for the weights
        model = build_model(config, dtype, device)  # empty storage in `dtype`, filled block by block below
        with _one_torch_thread():
            fill_weights(
                model, gguf_weights(file, config), len(file.tensors), f"loading {path.name}", progress
            )
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids}
    return LoadedModel(model, config, tokenizer, gen, path)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch on one thread while GGUF blocks are copied in (restored after).

    Each ~4 MiB block's copy (with dtype conversion) is memory-bound and takes milliseconds, while the
    numpy dequantization around it is single-threaded anyway; an OpenMP team per copy gains little and,
    on a CPU shared with other work, waits at every barrier for a descheduled thread: measured on 2 busy
    cores, 128 such copies took 1.6 s on 2 threads and 0.18 s on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load_hf_dir(
    path: Path, dtype: torch.dtype, device, progress: bool, quantized_layout: str = "torch"
) -> LoadedModel:
    from slimlm.loading.safetensors_dir import (
        count_tensors,
        iter_safetensors,
        read_generation_config,
        safetensors_files,
    )
    from slimlm.tokenizer import Tokenizer

    if not (path / "config.json").is_file():
        raise SlimlmError(f"{path} is not a model directory: config.json is missing")
    config = ModelConfig.from_json_file(path / "config.json")
    files = safetensors_files(path)
    if config.quantization:
        from slimlm.loading.quantized import load_quantized_dir

        model = load_quantized_dir(path, config, files, dtype, device, progress, quantized_layout)
    else:
        model = build_model(config, dtype, device)
        from slimlm.loading.file_pages import released_after_copy

        # each tensor's file pages dropped once copied: not the whole file resident beside the model
        tensors = released_after_copy(iter_safetensors(files), files)
        fill_weights(model, tensors, count_tensors(files), f"loading {path.name}", progress)
    config.torch_dtype = str(dtype).removeprefix("torch.")
    tokenizer = Tokenizer.from_hf_dir(path)
    gen = read_generation_config(path)
    if gen.get("eos_token_id") is not None:
        eos = gen["eos_token_id"]
        config.eos_token_ids = list(
            dict.fromkeys(config.eos_token_ids + ([eos] if isinstance(eos, int) else list(eos)))
        )
    return LoadedModel(model, config, tokenizer, gen, path)


__all__ = ["DEFAULT_ALIAS", "LoadedModel", "default_model_path", "load", "load_config", "parse_dtype"]
