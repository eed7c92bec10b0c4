"""The decode backend, chosen once: lay the weights out, build the C decoder or say why not.

`choose_backend` is the one place that decides how an engine's decode steps run. It sees the model, the
KV pool and the settings together, so nothing is predicted beforehand: where the C kernel can run, the
weights are laid out for it (plain bf16 rows with q/k/v and gate/up fused; quantized weights repacked
into the kernel's int4/int8 layout, once, replacing the PyTorch-side modules); otherwise they get the
layout PyTorch runs fastest and the reason goes into the memory report. New backends plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimlm.engine.config import EngineConfig
from slimlm.errors import SlimlmError
from slimlm.models.prepack import prepare_linears

KEEP_LAYOUT = "as loaded"  # EngineConfig.weights_layout: leave the caller's model as it is


@dataclass
class DecodeBackend:
    """What the runner receives: the C decoder (or None for PyTorch) and what to report about it."""

    description: str  # "C kernel", "C kernel (portable)" or "torch (why not)"
    weights_layout: str
    decoder: object | None = None  # a slimlm.kernels.fused_decode.FusedDecoder
    weights: str = ""  # the weight format decode steps read, e.g. "bf16" or "int4 g32 (C kernel layout)"
    notes: list[str] = field(default_factory=list)

    @property
    def scratch_bytes(self) -> int:
        return self.decoder.scratch_bytes if self.decoder is not None else 0


def auto_weights_layout(max_num_seqs: int, dtype: torch.dtype, c_kernel: bool = False) -> str:
    """Plain weights where decode steps read plain rows: the C decode kernel (`c_kernel`: it will run,
    at any batch size), or torch's reduced-precision GEMV for one sequence at a time in bf16/fp16.
    Otherwise oneDNN-packed (fastest PyTorch kernel for batches, and for float32 at any batch size:
    docs/engine.md). "both" is never automatic: it holds the linear weights twice."""
    one_stream = max_num_seqs == 1 and dtype in (torch.bfloat16, torch.float16)
    return "plain" if c_kernel or one_stream else "packed"


def quantized_layout(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> str:
    """How the loader should build a quantized checkpoint for this engine: "kernel" (straight into the
    C kernel's layout, held once) where `choose_backend` would repack it anyway: a bf16 CPU engine that
    lays its weights out and has the kernel's library (fast, unless --decode-kernel c). Otherwise
    "torch" (PyTorch's QuantLinear modules, which the torch path runs). Decided before loading because
    the PyTorch copy is never built in the "kernel" form; a checkpoint the kernel cannot run is loaded
    the "torch" way by the loader itself (slimlm/loading/quantized.py)."""
    if config.decode_kernel == "torch" or config.weights_layout == KEEP_LAYOUT:
        return "torch"
    if device.type != "cpu" or dtype != torch.bfloat16:
        return "torch"
    from slimlm.kernels.library import library

    lib, _ = library(False, True, require_fast=config.decode_kernel == "auto")
    return "kernel" if lib is not None else "torch"


def _lay_out(model, config: EngineConfig, c_kernel: bool) -> str:
    layout = config.weights_layout
    if layout == KEEP_LAYOUT:
        return layout
    if layout == "auto":
        batch = 1 if config.single_stream else config.max_num_seqs
        layout = auto_weights_layout(batch, next(model.parameters()).dtype, c_kernel)
    # A tied lm_head stays plain in "packed": a packed copy of the embedding table would add 21% to
    # SmolLM2's weights. "both" trades memory for speed everywhere, so it packs a copy too.
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    prepare_linears(model, layout, include_lm_head=layout == "both" or not tied)
    return layout


def _weights_description(model) -> str:
    from slimlm.kernels.qlinear import KernelLinear

    kinds = sorted({m.kernel_weight().describe() for m in model.modules() if isinstance(m, KernelLinear)})
    dtype = str(model.model.norm.weight.dtype).removeprefix("torch.") if hasattr(model, "model") else "?"
    return f"{', '.join(kinds)} (C kernel layout), rest {dtype}" if kinds else dtype


def _library_reason(model, config: EngineConfig) -> str | None:
    """Why the built library cannot serve this model's weights (no compiler; "auto" without the vector
    paths its weights need), judged from the module types before anything is laid out."""
    from torch import nn

    from slimlm.kernels.library import library
    from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
    from slimlm.models.prepack import PackedLinear
    from slimlm.quant.embedding import QuantEmbedding
    from slimlm.quant.linear import QuantLinear

    quant = (QuantLinear, QuantEmbedding, KernelLinear, KernelEmbedding)
    needs_int = any(isinstance(m, quant) for m in model.modules())
    needs_bf16 = any(type(m) in (nn.Linear, nn.Embedding, PackedLinear) for m in model.modules())
    lib, what = library(needs_bf16, needs_int, require_fast=config.decode_kernel == "auto")
    return None if lib is not None else what


def choose_backend(model, cache, config: EngineConfig, max_ctx: int) -> DecodeBackend:
    """Lay out `model`'s weights and pick what its decode steps run on (see the module docstring).
    `--decode-kernel c` (config.decode_kernel == "c") turns every reason not to into a SlimlmError."""
    if config.decode_kernel == "torch":
        return DecodeBackend(
            "torch (asked for)", _lay_out(model, config, False), weights=_weights_description(model)
        )
    from slimlm.kernels.fused_decode import FusedDecoder, blocker
    from slimlm.kernels.qlayout import has_quantized, quantized_reason, to_kernel_layout

    why = blocker(model, cache) or _library_reason(model, config)
    if why is None and has_quantized(model):
        why = quantized_reason(model)
        if why is None and config.weights_layout == KEEP_LAYOUT:
            why = "quantized weights are repacked for the C kernel only when the engine lays the weights out"
    if why is None:
        layout = _lay_out(model, config, True)
        if has_quantized(model):
            to_kernel_layout(model)
        decoder, what = FusedDecoder.create(
            model, cache, max_ctx, max_batch=config.max_num_seqs, require_fast=config.decode_kernel == "auto"
        )
        if decoder is not None:
            return DecodeBackend(what, layout, decoder, _weights_description(model))
        why = what
    else:
        layout = _lay_out(model, config, False)
    if config.decode_kernel == "c":
        raise SlimlmError(f"--decode-kernel c cannot run here: {why}; use --decode-kernel auto or torch")
    return DecodeBackend(f"torch ({why})", layout, weights=_weights_description(model))
