"""Quantized HF-style checkpoints (slimlm's own, AutoAWQ GEMM, GPTQ), built on the meta skeleton so that
the float linear weights are never allocated, in one of two forms (`layout`, chosen by the caller):

- "torch": PyTorch's QuantLinear / QuantEmbedding modules (int4 tinygemm, int8 kernels). What training
  (QLoRA), `quantize`, CUDA and `--decode-kernel torch` use.
- "kernel": straight into the C kernel's layout (KernelLinear / KernelEmbedding, q/k/v and gate/up fused),
  one checkpoint tensor at a time from the memory-mapped file, so the weights are held once: no
  QuantLinear copy is ever built to be repacked (slimlm/engine/backend.py asks for this where it would
  repack anyway). A checkpoint the kernel cannot run (group sizes, mixed q/k/v schemes, an act-order
  head) is loaded the "torch" way instead, and the backend reports why, as it does for a model passed in.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

from slimlm.config import ModelConfig
from slimlm.heap import release_free_heap
from slimlm.loading.safetensors_dir import iter_safetensors
from slimlm.loading.weights import fill_weights
from slimlm.models import materialize_empty, meta_model

LAYOUTS = ("torch", "kernel")
TABLE_ROWS = 4096  # a vocab-sized table is converted this many rows at a time (peak RSS of the load)


def load_quantized_dir(
    path: Path,
    config: ModelConfig,
    files: list[Path],
    dtype: torch.dtype,
    device,
    progress: bool,
    layout: str = "torch",
):
    if layout == "kernel":
        model = _load_kernel_layout(path, config, files, dtype, progress)
        if model is not None:
            return model
    from slimlm.quant.embedding import QuantEmbedding
    from slimlm.quant.format import load_quantized_state
    from slimlm.quant.linear import QuantLinear

    model = meta_model(config)
    state = dict(iter_safetensors(files))  # memory-mapped views, not copies
    rest = load_quantized_state(model, state, config.quantization, device=device)
    materialize_empty(model, dtype, device)  # the QuantLinear / QuantEmbedding modules are real already
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    for module in model.modules():  # QuantLinear biases and scales follow the compute dtype
        if isinstance(module, QuantLinear) and getattr(module, "bias", None) is not None:
            module.bias.data = module.bias.data.to(dtype)
        if isinstance(module, QuantEmbedding):  # looked-up rows come out in the compute dtype
            module.dtype = dtype
    model.init_buffers(device)
    if config.tie_word_embeddings and not isinstance(model.model.embed_tokens, QuantEmbedding):
        model.lm_head.weight = model.model.embed_tokens.weight
    quantized_params = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for p, _ in m.named_parameters()
    }
    fill_weights(
        model, rest.items(), len(rest), f"loading {path.name}", progress, already_loaded=quantized_params
    )
    return model.eval()


def _load_kernel_layout(
    path: Path, config: ModelConfig, files: list[Path], dtype: torch.dtype, progress: bool
):
    """The model with every quantized module in the C kernel's layout, or None when the checkpoint has
    a scheme the kernel cannot run (nothing of this attempt is kept)."""
    from slimlm.kernels.qlayout import quantized_reason, to_kernel_layout
    from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
    from slimlm.kernels.qweights import from_quantized, kernel_scheme_reason, stack_rows
    from slimlm.quant.format import quantized_entries, rest_of_state

    model = meta_model(config)
    state = dict(iter_safetensors(files))  # memory-mapped views: each is read once, below
    mapped = file_mappings(files)
    entries = quantized_entries(model, state, config.quantization)
    for entry in entries:
        rows, k = entry.shape
        bias = entry.tensors.get("bias")
        bias = None if bias is None else bias.to(dtype)
        if entry.is_embedding or rows > TABLE_ROWS and entry.method == "slimlm":
            parts = [entry.read(slice(i, min(i + TABLE_ROWS, rows))) for i in range(0, rows, TABLE_ROWS)]
            first = parts[0]
        else:
            parts = [entry.read()]
            first = parts[0]
        if kernel_scheme_reason(first.bits, first.group_size, k) is not None:
            return None
        weight = stack_rows([from_quantized(p) for p in parts]) if len(parts) > 1 else from_quantized(first)
        del parts, first
        for t in entry.tensors.values():  # converted: the file's pages need not stay resident
            release_pages(t, mapped)
        release_free_heap()  # the conversion's freed temporaries, below the kept weights (slimlm/heap.py)
        if entry.is_embedding:
            tied = config.tie_word_embeddings
            table = KernelLinear(weight, bias if tied else None)
            scale = entry.tensors.get("lookup_scale")
            model.model.embed_tokens = KernelEmbedding(table, dtype, tied, scale)
            if tied:
                model.lm_head = table
        else:
            parent_name, _, child = entry.prefix.rpartition(".")
            setattr(
                model.get_submodule(parent_name) if parent_name else model, child, KernelLinear(weight, bias)
            )
    if quantized_reason(model) is not None:
        return None
    to_kernel_layout(model)  # fuses q/k/v and gate/up
    materialize_empty(model, dtype, "cpu")  # norms, float embeddings or head: still on meta
    model.init_buffers("cpu")
    if config.tie_word_embeddings and not isinstance(model.model.embed_tokens, KernelEmbedding):
        model.lm_head.weight = model.model.embed_tokens.weight
    rest = rest_of_state(state, entries)
    built = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, KernelLinear)
             for p, _ in m.named_parameters()}  # fmt: skip
    fill_weights(model, _released_once_copied(rest.items(), mapped), len(rest), f"loading {path.name}", progress,
                 already_loaded=built)  # fmt: skip
    return model.eval()


def _released_once_copied(items, mapped: list[tuple[int, int]]):
    """`items` with each tensor's file pages released once it is copied: a float embedding or head read
    from the file would otherwise stay resident beside its copy (~110 MiB at the peak of a w8 SmolLM2
    load, whose table is bf16). Large tensors are copied and released TABLE_ROWS rows at a time."""
    for name, tensor in items:
        yield name, _FileRows(tensor, mapped)


class _FileRows:
    """A lazy source for fill_weights: copies a mapped tensor in row blocks, releasing each block's pages."""

    def __init__(self, tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
        self.tensor, self.mapped, self.shape = tensor, mapped, tensor.shape

    def copy_to(self, target: torch.Tensor) -> None:
        t = self.tensor
        if t.dim() < 2:  # norms, biases, scalars: small
            target.copy_(t)
            release_pages(t, self.mapped)
            return
        step = TABLE_ROWS
        for i in range(0, t.shape[0], step):
            target[i : i + step].copy_(t[i : i + step])
            release_pages(t[i : i + step], self.mapped)


def file_mappings(files: list[Path]) -> list[tuple[int, int]]:
    """The address ranges where `files` are mapped into this process (Linux; else none)."""
    names = {str(Path(f).resolve()) for f in files}
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() in names:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def release_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the resident pages of a memory-mapped checkpoint tensor once it has been converted.

    A safetensors tensor is a view of the file mapping; every page read while converting it stays in
    the process's RSS until the mapping goes, so without this the whole file (80 MiB for a w4 SmolLM2)
    is resident beside its converted copy at the end of the load. The mapping is a clean read-only one
    (nothing writes to it), so MADV_DONTNEED only drops pages: touching them again re-reads the file.
    Only ranges inside one of `mapped` (file_mappings) are touched: never anonymous memory, which
    MADV_DONTNEED would zero."""
    libc = _libc()
    if libc is None or not t.is_cpu or t.numel() == 0:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = t.data_ptr() // page * page
    end = -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page
    if any(lo <= start and end <= hi for lo, hi in mapped):
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


_MADV_DONTNEED = 4


@functools.cache
def _libc():
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None
