"""AWQ (Lin et al., 2023): protect the weight channels that see large activations by scaling them up
before quantization and folding the inverse scale into the operation that produces their input.

Per group of linears sharing one input x, the search tries s = mean|x|^α for α = 0, 1/20, ..., 19/20
(normalised so that sqrt(max·min) = 1) and keeps the α whose quantized outputs Q(W·s)(x/s) are closest
to W x over all calibration tokens, computed exactly from E[x xᵀ] (see stats.py). Folding targets, as in
AutoAWQ: input_layernorm -> q,k,v; v_proj -> o_proj only when both weights have the same shape (with
GQA one v channel feeds several o inputs); post_attention_layernorm -> gate,up; up_proj -> down_proj.
Unlike AutoAWQ, the loss is measured on the linears' own outputs instead of the attention block's
output, which keeps this free of the model's forward signature. The optional clipping search then
shrinks each group's range (not for q/k, whose errors the softmax amplifies) to minimise each group's
output error.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.quant.rtn import fake_quantize, rtn_quantize
from slimlm.quant.scheme import QuantizedWeight, check_scheme
from slimlm.quant.stats import InputStats

# (module that produces the input, linears reading it), relative to a decoder layer; HF names.
SCALE_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
NO_CLIP = ("q_proj", "k_proj", "qkv_proj")


def _output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean over inputs of ‖ΔW x‖², from E[x xᵀ]: Σ (ΔW G) ⊙ ΔW."""
    return float(((delta @ gram) * delta).sum())


@torch.no_grad()
def awq_search_scale(
    stats: InputStats,
    weights: list[torch.Tensor],
    bits: int,
    group_size: int,
    sym: bool = False,
    grid: int = 20,
    float_zero: bool = False,
) -> torch.Tensor:
    """Best per-input-channel scale [in] for the weights [out_i, in] that all read the input of `stats`."""
    w = torch.cat([w.float() for w in weights], dim=0)  # [sum out, in]
    best_loss, best_scale = float("inf"), torch.ones_like(stats.abs_mean)
    for step in range(grid):
        scale = stats.abs_mean.pow(step / grid).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        w_q = fake_quantize(w * scale, bits, group_size, sym, float_zero) / scale
        loss = _output_error(w_q - w, stats.gram)
        if loss < best_loss:
            best_loss, best_scale = loss, scale
    return best_scale


@torch.no_grad()
def awq_search_clip(
    weight: torch.Tensor,
    stats: InputStats,
    bits: int,
    group_size: int,
    sym: bool = False,
    grid: int = 20,
    max_shrink: float = 0.5,
    float_zero: bool = False,
) -> torch.Tensor:
    """Per (row, group) clipping threshold [out, groups] that minimises that group's output error."""
    out, n_in = weight.shape
    group_size = check_scheme(bits, group_size, n_in)
    n_groups = n_in // group_size
    # A group's contribution to the error only involves its diagonal block of E[x xᵀ].
    gram = stats.gram.view(n_groups, group_size, n_groups, group_size).diagonal(dim1=0, dim2=2)
    gram_blocks = gram.permute(2, 0, 1)  # [groups, gs, gs]
    w = weight.float().view(out, n_groups, group_size)
    original_max = w.abs().amax(dim=-1)  # [out, groups]
    best_max, best_err = original_max.clone(), torch.full_like(original_max, float("inf"))
    for step in range(int(max_shrink * grid)):
        max_val = original_max * (1 - step / grid)
        clipped = torch.maximum(torch.minimum(w, max_val.unsqueeze(-1)), -max_val.unsqueeze(-1))
        delta = (
            fake_quantize(clipped.view(out, n_in), bits, group_size, sym, float_zero).view(
                out, n_groups, group_size
            )
            - w
        )
        err = torch.einsum("ogk,gkl,ogl->og", delta, gram_blocks, delta)  # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


@torch.no_grad()
def fold_scale(producer: nn.Module, consumers: list[nn.Linear], scale: torch.Tensor) -> None:
    """producer outputs /= scale, consumers' input columns *= scale: the float function is unchanged."""
    s = scale.to(producer.weight.dtype)
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.view(-1, 1))
    elif hasattr(producer, "divide_output"):  # a norm whose output is not weight * x (Gemma's 1 + w)
        producer.divide_output(scale)
    else:  # a norm: its elementwise weight scales its output
        producer.weight.div_(s)
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s)
    for linear in consumers:
        linear.weight.mul_(scale.to(linear.weight.dtype))


@torch.no_grad()
def awq_quantize_layer(
    layer: nn.Module,
    stats: dict[str, InputStats],
    bits: int,
    group_size: int,
    sym: bool = False,
    grid: int = 20,
    clip: bool = True,
    float_zero: bool = False,
) -> dict[str, QuantizedWeight]:
    """Search and fold the scales of one decoder layer, then quantize each of its linears.

    `stats` maps each linear's name (relative to `layer`) to the statistics of its inputs (linears that
    read one tensor share one object); they are updated in place as scales are folded. Returns the
    quantized weight of every linear in `stats`.
    """
    modules = awq_fold_scales(layer, stats, bits, group_size, sym, grid, float_zero)
    result = {}
    for name, input_stats in stats.items():
        linear = modules[name]
        if clip and not name.endswith(NO_CLIP):
            max_val = awq_search_clip(
                linear.weight, input_stats, bits, group_size, sym, grid, float_zero=float_zero
            )
            _clamp_groups(linear.weight, max_val.to(linear.weight.dtype), group_size)
        result[name] = rtn_quantize(linear.weight.detach(), bits, group_size, sym, float_zero)
    return result


@torch.no_grad()
def awq_fold_scales(
    layer: nn.Module,
    stats: dict[str, InputStats],
    bits: int,
    group_size: int,
    sym: bool = False,
    grid: int = 20,
    float_zero: bool = False,
) -> dict[str, nn.Module]:
    """Search and fold one decoder layer's AWQ scales (updating `stats` in place); returns the layer's
    modules by name. AWQ + GPTQ (quantize.py) runs GPTQ on the weights and statistics this leaves."""
    modules = dict(layer.named_modules())
    for producer_name, consumer_names in getattr(layer, "awq_scale_groups", SCALE_GROUPS):  # per family
        producer = modules.get(producer_name)
        consumers = [modules.get(name) for name in consumer_names]
        if producer is None or any(
            c is None or n not in stats for c, n in zip(consumers, consumer_names, strict=True)
        ):
            continue
        if isinstance(producer, nn.Linear) and producer.weight.shape != consumers[0].weight.shape:
            continue  # GQA v_proj -> o_proj: not foldable channel for channel
        shared = stats[consumer_names[0]]
        scale = awq_search_scale(
            shared, [c.weight for c in consumers], bits, group_size, sym, grid, float_zero=float_zero
        )
        fold_scale(producer, consumers, scale)
        for unique in {id(stats[n]): stats[n] for n in consumer_names}.values():
            unique.divide_inputs(scale)
    return modules


@torch.no_grad()
def _clamp_groups(weight: torch.Tensor, max_val: torch.Tensor, group_size: int) -> None:
    out, n_in = weight.shape
    group_size = n_in if group_size == -1 else group_size
    grouped = weight.view(out, n_in // group_size, group_size)
    grouped.copy_(torch.maximum(torch.minimum(grouped, max_val.unsqueeze(-1)), -max_val.unsqueeze(-1)))
