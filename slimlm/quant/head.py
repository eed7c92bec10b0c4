"""The lm_head with calibration (and, when tied, the token embedding that shares its table).

After the decoder layers, the head's inputs are the final norm's outputs over the calibration batches
(the last layer's outputs as the decoder pass left them: quantized for GPTQ, float for AWQ). Then:
- gptq: GPTQ on the Hessian of those inputs. No act-order: lookups gather whole rows in stored order.
- awq: a per-input-channel scale s folded into the final norm (norm.weight / s, table W·s), then AWQ's
  clipping search. A tied embedding would look rows up in the same W·s table, storing s and dividing the
  gathered rows by it (QuantEmbedding.lookup_scale; s rounded to bf16 so any float cast keeps it exact).
  By default only an untied head gets the scale: on tied SmolLM2-135M w4 g64 clipping alone measured
  ppl 18.66 vs 18.77 with the scale (`scale=True` still does it, and such checkpoints load).
- rtn, or no usable inputs: RTN (embedding.quantize_embeddings).
The untied embedding is RTN in every case: its error does not depend on any activation.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.quant.awq import _clamp_groups, awq_search_clip, awq_search_scale
from slimlm.quant.embedding import (
    check_embeddings,
    embedding_scheme,
    install_embedding,
    narrow_table,
    quantize_embeddings,
)
from slimlm.quant.gptq import gptq_quantize
from slimlm.quant.linear import make_quant_linear
from slimlm.quant.rtn import rtn_quantize
from slimlm.quant.search import importance_for
from slimlm.quant.stats import InputStats


def final_norm(model: nn.Module) -> nn.Module | None:
    """`model.model.norm` (HF and slimlm decoders), the module whose output the lm_head reads."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    return norm if isinstance(norm, nn.Module) else None


@torch.no_grad()
def head_input_stats(model: nn.Module, states: list) -> InputStats | None:
    """Statistics of the lm_head inputs from the states after the last decoder layer; None if unknown."""
    norm, stats = final_norm(model), None
    for state in states:
        hidden = getattr(state, "hidden", state)
        if not isinstance(hidden, torch.Tensor):
            return None  # a custom run_layer state we cannot read: fall back to RTN
        x = norm(hidden) if norm is not None else hidden
        stats = stats or InputStats(x.shape[-1], x.device)
        stats.add(x)
    return stats


@torch.no_grad()
def quantize_head(
    model: nn.Module,
    method: str,
    stats: InputStats | None,
    bits: int,
    group_size: int,
    sym: bool,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    grid: int = 20,
    clip: bool = True,
    scale: bool | None = None,
    float_zero: bool = False,
    scale_search: str = "minmax",
    table_group: int | None = None,
) -> str:
    """Quantize the embedding and lm_head in place; returns the method the head actually got.

    `scale_search` (quant/search.py): the grids of rtn and gptq heads; "imatrix" weighs the head's input
    columns by the calibration statistics (the unweighted search where there are none).
    `table_group`: the table's own group size (embedding.embedding_scheme).
    """
    embed = check_embeddings(model, bits, group_size, table_group)
    head = getattr(model, "lm_head", None)
    norm = final_norm(model)
    if method == "rtn" or stats is None or not isinstance(head, nn.Linear):
        search = "mse" if scale_search == "imatrix" and stats is None else scale_search
        imp = importance_for(search, embed.embedding_dim, None if stats is None else stats.gram)
        quantize_embeddings(model, bits, group_size, sym, float_zero, imp, table_group)
        return "rtn"
    tied = head.weight is embed.weight
    scale = not tied if scale is None else scale
    gs, sym = embedding_scheme(bits, group_size, sym, table_group)
    w = head.weight.detach().float().clone()
    lookup_scale = None
    if method == "gptq":
        qweight = gptq_quantize(
            w, stats.hessian, bits, gs, sym, False, damp, block_size, float_zero, scale_search
        )
    else:
        norm_weight = getattr(norm, "weight", None)
        if scale and isinstance(norm_weight, torch.Tensor) and norm_weight.shape == (w.shape[1],):
            s = awq_search_scale(stats, [w], bits, gs, sym, grid, float_zero).to(torch.bfloat16).float()
            norm_weight.div_(s.to(norm_weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s.to(norm.bias.dtype))
            w.mul_(s)
            stats.divide_inputs(s)
            lookup_scale = s if tied else None
        if clip:
            _clamp_groups(w, awq_search_clip(w, stats, bits, gs, sym, grid, float_zero=float_zero), gs)
        qweight = rtn_quantize(w, bits, gs, sym, float_zero)
    dtype = embed.weight.dtype
    if tied:
        install_embedding(model, qweight, dtype, head.bias, lookup_scale=lookup_scale)
    else:
        embed_imp = importance_for("minmax" if scale_search == "minmax" else "mse", w.shape[1])
        table = rtn_quantize(
            embed.weight.detach(), bits, gs, sym, float_zero, embed_imp, narrow_table(bits, gs)
        )
        install_embedding(model, table, dtype)
        model.lm_head = make_quant_linear(qweight, head.bias)
    return method
