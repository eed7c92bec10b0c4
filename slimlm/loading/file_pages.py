"""A float checkpoint's file pages released as its tensors are copied (HF safetensors directories).

safetensors maps each file and hands out views of the mapping; every page the loader reads stays in the
process's RSS until the file is closed, i.e. after its last tensor. With one file per model (SmolLM2-1.7B
ships one 3.4 GB model.safetensors) the whole file was resident beside the model's copy at the end of the
load: twice the weights at the peak. The quantized loader already releases its pages (quantized.py);
this applies the same to the float load: each tensor is copied in row blocks, each block's pages dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from slimlm.loading.quantized import _FileRows, file_mappings


def released_after_copy(
    tensors: Iterable[tuple[str, torch.Tensor]], files: list[Path]
) -> Iterator[tuple[str, _FileRows]]:
    """`tensors` (iter_safetensors) as lazy sources for fill_weights that release their file pages. The
    mappings are looked up again when a tensor lies outside the known ones (the next file was opened)."""
    mapped: list[tuple[int, int]] = []
    for name, tensor in tensors:
        ptr = tensor.data_ptr()
        if tensor.is_cpu and not any(lo <= ptr < hi for lo, hi in mapped):
            mapped = file_mappings(files)
        yield name, _FileRows(tensor, mapped)
