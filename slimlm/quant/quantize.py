"""Quantize a model in place: swap the nn.Linear modules of its decoder layers for QuantLinear modules,
and the token embedding / lm_head for a QuantEmbedding and a QuantLinear (see embedding.py, head.py).

Calibration runs layer by layer (the model is never run whole after the first layer's inputs are
captured), so only one layer's activations for the calibration set are held at a time. Two callables
keep this independent of the model's forward signature:

- `capture_layer0_inputs(model, batch) -> state`: the inputs of `model.model.layers[0]` for one batch,
- `run_layer(layer, state) -> state`: the same inputs for the next layer.

The defaults capture (args, kwargs) of the first layer with a pre-hook that stops the forward, and
call `layer(hidden, *args, **kwargs)`; they work for HF transformers models and for slimlm's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.formats.weights import linear_group_size, quantize_embeddings_for, table_group_size
from slimlm.progress import progress_bar
from slimlm.quant.awq import awq_fold_scales, awq_quantize_layer
from slimlm.quant.embedding import QuantEmbedding, check_embeddings
from slimlm.quant.gptq import gptq_quantize
from slimlm.quant.head import head_input_stats, quantize_head
from slimlm.quant.linear import QuantLinear, make_quant_linear
from slimlm.quant.rotate import rotate_model
from slimlm.quant.rtn import rtn_quantize
from slimlm.quant.scheme import SUPPORTED_GROUP_SIZES, QuantizedWeight, check_scheme
from slimlm.quant.search import check_scale_search, importance_for
from slimlm.quant.stats import InputStats

METHODS = ("rtn", "awq", "gptq", "awq-gptq")
FORMAT_VERSION = 1


@dataclass
class LayerInputs:
    """What one decoder layer is called with: hidden states plus everything else, unchanged."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class _StopForward(Exception):
    def __init__(self, inputs: LayerInputs) -> None:
        self.inputs = inputs


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """`model.model.layers`, the decoder stack of HF-style and slimlm models."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise SlimlmError("cannot quantize this model: it has no decoder layers at model.model.layers")
    return layers


def capture_layer0_inputs(model: nn.Module, batch: torch.Tensor) -> LayerInputs:
    """Run the model on `batch` [B, S] until its first decoder layer and return that layer's inputs."""

    def stop(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        raise _StopForward(LayerInputs(hidden, tuple(args[1:]), dict(kwargs)))

    handle = decoder_layers(model)[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        if hasattr(model, "forward_dense"):  # slimlm models
            model.forward_dense(batch)
        else:  # HF models
            model(input_ids=batch, use_cache=False)
    except _StopForward as captured:
        return captured.inputs
    finally:
        handle.remove()
    raise SlimlmError("the model's forward never reached its first decoder layer")


def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Call one decoder layer and wrap its output hidden states as the next layer's inputs."""
    out = layer(inputs.hidden, *inputs.args, **inputs.kwargs)
    hidden = out[0] if isinstance(out, tuple | list) else out
    return LayerInputs(hidden, inputs.args, inputs.kwargs)


def group_sizes_that_fit(model: nn.Module) -> list[int]:
    """The supported group sizes (largest first) that divide the input width of every decoder linear and
    of the embedding (quantized at 4 bits by default); e.g. 64 and 32 for SmolLM2-135M (576 = 9 x 64)."""
    widths = {linear.in_features for layer in decoder_layers(model) for linear in _linears(layer).values()}
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(embed, nn.Embedding):
        widths.add(embed.embedding_dim)
    return [
        g for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True) if g > 0 and all(w % g == 0 for w in widths)
    ]


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: str,
    bits: int,
    group_size: int,
    calib_batches: list[torch.Tensor] | None = None,
    progress: bool = True,
    *,
    sym: bool | None = None,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    awq_grid: int = 20,
    awq_clip: bool = True,
    capture_layer0_inputs: Callable[[nn.Module, torch.Tensor], Any] = capture_layer0_inputs,
    run_layer: Callable[[nn.Module, Any], Any] = run_layer,
    quantize_embeddings: bool | str | None = None,
    float_zero: bool = False,
    embedding_bits: int | None = None,
    group_sizes: dict[str, int] | None = None,
    rotate: str | None = None,
    embedding_group_size: int | None = None,
    rotate_seed: int = 0,
    scale_search: str = "minmax",
) -> dict:
    """Quantize every nn.Linear inside the decoder layers in place, then, if `quantize_embeddings` says so
    (True/"quantize", False/"float", None/"auto": 4 bits only, see slimlm/formats/weights.py), the token
    embedding and lm_head: one shared table when tied; the head with the same method (see quant/head.py).

    `sym` defaults to symmetric for 8 bits (the int8 kernel has no zero point) and asymmetric for 4.
    `float_zero` (4-bit asymmetric): float zero points, w = s·q + min per group (see rtn.group_qparams).
    `embedding_bits` (default `bits`): the embedding/lm_head table's own bits, e.g. 8 beside 4-bit
    decoder weights (llama.cpp keeps these at 6-8 bits; at 8 the table is symmetric).
    `embedding_group_size`: the table's group size (default: formats.weights.table_group_size).
    `group_sizes` maps a linear's name inside a decoder layer (e.g. "mlp.down_proj", every layer) or in
    one layer ("3.mlp.down_proj") to its own group size (mixed precision: the sensitive tensors get
    smaller groups, i.e. more bits per weight; see benchmarks/weight_sensitivity.py).
    `rotate` ("hadamard" | "orthogonal"): first fold the norms and rotate the model (quant/rotate.py;
    a tied embedding is untied). "awq-gptq": AWQ's scales folded, then GPTQ instead of RTN.
    `scale_search` ("minmax" | "mse" | "imatrix", quant/search.py): how rtn, gptq and awq-gptq choose
    each group's grid; "imatrix" weighs each input column by its calibration inputs' mean square (with
    rtn it needs calibration batches too: llama.cpp's importance-matrix quantization).
    Returns the quantization section of the checkpoint config.
    """
    if method not in METHODS:
        raise SlimlmError(f"unknown quantization method {method!r}: use one of {', '.join(METHODS)}")
    check_scale_search(scale_search)
    if method == "awq" and scale_search != "minmax":
        raise SlimlmError(f"--scale-search {scale_search} applies to rtn, gptq and awq-gptq; awq picks its "
                          "grids by its own clipping search (use --method awq-gptq to combine them)")  # fmt: skip
    check_scheme(bits, group_size)
    layers = decoder_layers(model)
    if any(isinstance(m, QuantLinear | QuantEmbedding) for m in model.modules()):
        raise SlimlmError("the model is already quantized: quantize the original float checkpoint instead")
    targets = [_linears(layer) for layer in layers]
    group_sizes = dict(group_sizes or {})
    known = {name for linears in targets for name in linears}
    known |= {f"{i}.{name}" for i, linears in enumerate(targets) for name in linears}
    for name, size in group_sizes.items():
        if name not in known:
            raise SlimlmError(f"group size given for {name!r}, which no decoder layer has: use one of "
                              f"{', '.join(sorted(n for n in known if not n[0].isdigit()))}, "
                              "optionally prefixed by a layer index (3.mlp.down_proj)")  # fmt: skip
        check_scheme(bits, size)
    for i, linears in enumerate(targets):
        for name, linear in linears.items():
            size = linear_group_size(group_sizes, i, name, group_size)
            if size != -1 and linear.in_features % size:
                working = ", ".join(map(str, [*group_sizes_that_fit(model), -1]))
                raise SlimlmError(
                    f"group size {size} does not divide the {linear.in_features} input features of "
                    f"model.layers.{i}.{name}; group sizes that fit this model: {working} "
                    "(-1: one scale per output channel)"
                )
    embeddings = quantize_embeddings
    if not isinstance(embeddings, bool):
        embeddings = "auto" if embeddings is None else embeddings
    quantize_embeddings = quantize_embeddings_for(embeddings, bits)
    embedding_bits = bits if embedding_bits is None else embedding_bits
    check_scheme(embedding_bits, group_size)
    table_group = table_group_size(bits, embedding_bits, group_size, embedding_group_size)
    check_scheme(embedding_bits, table_group)
    if quantize_embeddings:
        check_embeddings(model, embedding_bits, group_size, table_group)
    sym = bits == 8 if sym is None else sym
    float_zero = bool(float_zero) and not sym
    calibrated = method != "rtn" or scale_search == "imatrix"
    if calibrated and (not calib_batches or any(b.numel() == 0 for b in calib_batches)):
        what = method if method != "rtn" else "--scale-search imatrix"
        raise SlimlmError(f"{what} needs calibration data: give at least one non-empty batch of token ids")

    # after every check above: a refused call leaves the model as it was
    rotation = rotate_model(model, rotate, rotate_seed) if rotate not in (None, "none") else None
    states = None
    if not calibrated:
        with progress_bar("quantize (rtn)", total=len(layers), enabled=progress) as advance:
            for i, (layer, linears) in enumerate(zip(layers, targets, strict=True)):
                for name, linear in linears.items():
                    gs = linear_group_size(group_sizes, i, name, group_size)
                    imp = importance_for(scale_search, linear.in_features)
                    qweight = rtn_quantize(linear.weight.detach(), bits, gs, sym, float_zero, imp)
                    _swap(layer, name, qweight, linear.bias)
                advance()
    else:
        with progress_bar("calibration", total=len(calib_batches), enabled=progress) as advance:
            states = []
            for batch in calib_batches:
                states.append(capture_layer0_inputs(model, batch))
                advance()
        with progress_bar(f"quantize ({method})", total=len(layers), enabled=progress) as advance:
            for i, (layer, linears) in enumerate(zip(layers, targets, strict=True)):
                sizes = {name: linear_group_size(group_sizes, i, name, group_size) for name in linears}
                if method == "rtn":  # with the importance matrix
                    states = _imatrix_layer(layer, linears, states, run_layer, bits, sym, float_zero, sizes)
                elif method in ("gptq", "awq-gptq"):
                    awq = awq_grid if method == "awq-gptq" else 0
                    states = _gptq_layer(layer, linears, states, run_layer, bits, group_size, sym,
                                         act_order, damp, block_size, float_zero, sizes, awq,
                                         scale_search)  # fmt: skip
                else:
                    states = _awq_layer(layer, linears, states, run_layer, bits, group_size, sym,
                                        awq_grid, awq_clip, float_zero, group_sizes)  # fmt: skip
                advance()
    head_method = None
    if quantize_embeddings:  # after the decoder: calibration above ran on the float embeddings
        stats = head_input_stats(model, states) if states is not None else None
        head_sym = True if embedding_bits == 8 else sym  # the 8-bit table is per-channel symmetric
        head_method = quantize_head(model, "gptq" if method == "awq-gptq" else method, stats, embedding_bits, group_size, head_sym, damp=damp,
                                    block_size=block_size, grid=awq_grid, clip=awq_clip,
                                    float_zero=float_zero and not head_sym,
                                    scale_search=scale_search, table_group=table_group)  # fmt: skip

    if isinstance(embeddings, bool):
        embeddings = "quantize" if embeddings else "float"
    config = {"quant_method": "slimlm", "format_version": FORMAT_VERSION, "method": method, "bits": bits,
              "group_size": group_size, "sym": sym, "embeddings": embeddings,
              "quantize_embeddings": quantize_embeddings}  # fmt: skip
    if head_method is not None:
        config["head_method"] = head_method
    if quantize_embeddings and embedding_bits != bits:
        config["embedding_bits"] = embedding_bits
    if quantize_embeddings and table_group != table_group_size(
        bits, embedding_bits, group_size, None, legacy=True
    ):
        config["embedding_group_size"] = table_group  # the planner reads it; loaders read the scales' shape
    if float_zero:
        config["zero"] = "float"
    if sym or (bits == 4 and not float_zero):  # d and m = -z·d fp16-exact (quant/kernel_scales.py): the
        config["fp16_scales"] = True  # C kernel holds them at 2 bytes; the planner reads this
    if group_sizes:
        config["group_sizes"] = group_sizes
    if scale_search != "minmax":
        config["scale_search"] = scale_search
    if rotation is not None:
        config["rotate"] = rotation
    if method in ("gptq", "awq-gptq"):
        config.update(act_order=act_order, damp=damp, block_size=block_size)
    if method == "awq-gptq":
        config.update(grid=awq_grid)
    if method == "awq":
        config.update(grid=awq_grid, clip=awq_clip)
    if calibrated:
        config["calibration"] = {
            "batches": len(calib_batches),
            "tokens": sum(b.numel() for b in calib_batches),
        }
    return config


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds: quantized codes/scales/zeros plus all float parameters.

    Tensors shared between modules (tied embeddings) count once; non-persistent buffers (RoPE tables)
    do not count.
    """
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        key = (
            (tensor.untyped_storage().data_ptr(), tensor.device)
            if tensor.device.type != "meta"
            else id(tensor)
        )
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if type(m) is nn.Linear}


def _swap(layer: nn.Module, name: str, qweight: QuantizedWeight, bias: torch.Tensor | None) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    setattr(parent, child, make_quant_linear(qweight, bias))


def _record_inputs(linears: dict[str, nn.Linear], sink: Callable[[dict[str, torch.Tensor]], None]):
    """Forward pre-hooks that collect each linear's input; `flush` hands one forward's inputs to `sink`.

    Linears that read the same tensor (q/k/v, gate/up) receive the very same tensor object, so callers
    can share work between them by identity.
    """
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            seen[name] = args[0]

        return record

    handles = [linear.register_forward_pre_hook(hook(name)) for name, linear in linears.items()]

    def flush():
        canonical: dict[tuple, torch.Tensor] = {}
        for name, x in seen.items():
            key = (x.data_ptr(), x.shape, x.stride())
            if key not in canonical:
                canonical[key] = x.reshape(-1, x.shape[-1])  # [tokens, in]
            seen[name] = canonical[key]
        sink(dict(seen))
        seen.clear()

    return handles, flush


def _collect_stats(layer, linears, states, run_layer) -> tuple[dict[str, InputStats], list]:
    """Run the layer on every calibration state; input statistics per linear (shared by identity)."""
    stats: dict[str, InputStats] = {}

    def accumulate(seen: dict[str, torch.Tensor]) -> None:
        if not stats:
            by_input: dict[int, InputStats] = {}
            for name, x in seen.items():
                if id(x) not in by_input:
                    by_input[id(x)] = InputStats(x.shape[-1], x.device)
                stats[name] = by_input[id(x)]
        added = set()
        for name, x in seen.items():
            if id(stats[name]) not in added:
                stats[name].add(x)
                added.add(id(stats[name]))

    handles, flush = _record_inputs(linears, accumulate)
    outputs = []
    try:
        for state in states:
            outputs.append(run_layer(layer, state))
            flush()
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in linears if name not in stats]
    if missing:
        raise SlimlmError(f"{', '.join(missing)} received no input during calibration; cannot quantize them")
    return stats, outputs


def _gptq_layer(layer, linears, states, run_layer, bits, group_size, sym, act_order, damp, block_size,
                float_zero=False, group_sizes=None, awq_grid=0, scale_search="minmax"):  # fmt: skip
    stats, _ = _collect_stats(layer, linears, states, run_layer)
    if awq_grid:  # AWQ + GPTQ: fold the scales AWQ finds (searched at the layer's default group size)
        awq_fold_scales(layer, stats, bits, group_size, sym, awq_grid, float_zero)
    for name, linear in linears.items():
        gs = (group_sizes or {}).get(name, group_size)
        qweight = gptq_quantize(linear.weight, stats[name].hessian, bits, gs, sym, act_order,
                                damp, block_size, float_zero, scale_search)  # fmt: skip
        _swap(layer, name, qweight, linear.bias)
    # GPTQ feeds the next layer this layer's quantized outputs, so later layers compensate earlier errors.
    return [run_layer(layer, state) for state in states]


def _imatrix_layer(layer, linears, states, run_layer, bits, sym, float_zero, group_sizes):
    """RTN on grids searched with the importance matrix (E[x_j²] per input column, from the float
    inputs as llama.cpp's imatrix collects them); the next layer sees this layer's float outputs."""
    stats, next_states = _collect_stats(layer, linears, states, run_layer)
    for name, linear in linears.items():
        imp = importance_for("imatrix", linear.in_features, stats[name].gram)
        qweight = rtn_quantize(linear.weight.detach(), bits, group_sizes[name], sym, float_zero, imp)
        _swap(layer, name, qweight, linear.bias)
    return next_states


def _awq_layer(layer, linears, states, run_layer, bits, group_size, sym, grid, clip, float_zero=False,
               group_sizes=None):  # fmt: skip
    stats, next_states = _collect_stats(layer, linears, states, run_layer)  # AWQ feeds on float outputs
    if group_sizes:
        raise SlimlmError("per-tensor group sizes are supported with rtn and gptq, not awq")
    layer_weights = awq_quantize_layer(layer, stats, bits, group_size, sym, grid, clip, float_zero)
    for name, qweight in layer_weights.items():
        _swap(layer, name, qweight, linears[name].bias)
    return next_states
