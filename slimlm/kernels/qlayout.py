"""Quantized models into the C kernel's weight layout: which ones can go, and the one-time repack.

Every quantized source slimlm loads (its own checkpoints, AutoAWQ, GPTQ with act-order, quantize's
output) arrives as QuantLinear / QuantEmbedding modules; `quantized_weight()` gives their portable
codes, scales and zero points, which kernels/qweights.py packs exactly. q/k/v and gate/up are fused
into one weight each (they read the same input), so they must share bits, group size and act-order
permutation. The QuantLinear modules are dropped: the model then holds one copy, in the kernel's layout.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.heap import release_free_heap
from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
from slimlm.kernels.qweights import concat, from_quantized, kernel_scheme_reason, stack_rows
from slimlm.models.prepack import FUSIONS

UNFUSED = (("o_proj",), ("down_proj",))


def _quant_types():
    from slimlm.quant.embedding import QuantEmbedding
    from slimlm.quant.linear import QuantLinear

    return QuantLinear, QuantEmbedding


def has_quantized(model: nn.Module) -> bool:
    QuantLinear, QuantEmbedding = _quant_types()
    return any(isinstance(m, QuantLinear | QuantEmbedding) for m in model.modules())


def _groups(module: nn.Module):
    """(fused attribute or None, [linears]) for each set of linears of `module` that read one input."""
    for fused, parts in FUSIONS:
        if fused in vars(module) or fused in module._modules:
            current = getattr(module, fused, None)
            if current is not None:
                yield fused, [current]
            elif all(hasattr(module, p) for p in parts):
                yield fused, [getattr(module, p) for p in parts]
    for (name,) in UNFUSED:
        if hasattr(module, name):
            yield None, [getattr(module, name)]


def _scheme_of(linear) -> tuple[int, int, int, torch.Tensor | None]:
    """QuantLinear and KernelLinear name these alike."""
    return linear.bits, linear.group_size, linear.in_features, linear.perm


def quantized_reason(model: nn.Module) -> str | None:
    """None when every quantized weight of `model` fits the kernel; else why not (for the memory report)."""
    QuantLinear, QuantEmbedding = _quant_types()
    quant = (QuantLinear, KernelLinear)
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp):
            for _fused, linears in _groups(module):
                kinds = {isinstance(lin, quant) for lin in linears}
                if kinds == {False}:
                    continue
                if len(kinds) > 1:
                    return "linears that read one input mix quantized and float weights"
                schemes = [_scheme_of(lin) for lin in linears]
                for bits, group, k, _ in schemes:
                    reason = kernel_scheme_reason(bits, group, k)
                    if reason:
                        return reason
                first = schemes[0]
                for bits, group, _, perm in schemes[1:]:
                    same_perm = (perm is None and first[3] is None) or (
                        perm is not None and first[3] is not None and torch.equal(perm, first[3])
                    )
                    if (bits, group) != first[:2] or not same_perm:
                        return (
                            "q/k/v or gate/up differ in bits, group size or act-order: the kernel fuses them"
                        )
    embed, head = model.model.embed_tokens, model.lm_head
    if isinstance(embed, QuantEmbedding):
        t = embed.table
        reason = kernel_scheme_reason(t.bits, t.group_size, t.in_features)
        if reason:
            return f"the embedding table: {reason}"
    if isinstance(head, QuantLinear | KernelLinear):
        if head.perm is not None:
            return "an act-order lm_head"
        reason = kernel_scheme_reason(head.bits, head.group_size, head.in_features)
        if reason:
            return f"the lm_head: {reason}"
    return None


def _kernel_linear(linears: list[nn.Module]) -> KernelLinear:
    if len(linears) == 1 and isinstance(linears[0], KernelLinear):
        return linears[0]
    weights = [
        lin.kernel_weight() if isinstance(lin, KernelLinear) else from_quantized(lin.quantized_weight())
        for lin in linears
    ]
    biases = [lin.bias for lin in linears]
    bias = None if all(b is None for b in biases) else torch.cat([
        b.detach() if b is not None else torch.zeros(lin.out_features, dtype=biases[0].dtype)
        for b, lin in zip(biases, linears, strict=True)
    ])  # fmt: skip
    return KernelLinear(weights[0] if len(weights) == 1 else concat(weights), bias)


def _table_weight(embed, chunk: int = 4096):
    """The embedding table in the kernel's layout, repacked `chunk` rows at a time: the whole table's
    unpacked codes (1 byte per weight, plus temporaries) never exist at once (peak RSS of a w4 load)."""
    n = embed.num_embeddings
    return stack_rows([
        from_quantized(embed.weight_rows(torch.arange(i, min(i + chunk, n)))) for i in range(0, n, chunk)
    ])  # fmt: skip


@torch.no_grad()
def to_kernel_layout(model: nn.Module) -> int:
    """Replace every QuantLinear / QuantEmbedding by the kernel's modules, in place (call after
    `quantized_reason` says None); q/k/v and gate/up are fused, also where they are KernelLinears already
    (loaded straight into this layout, one per checkpoint tensor). Returns how many modules were replaced."""
    QuantLinear, QuantEmbedding = _quant_types()
    changed = 0
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp):
            for fused, linears in list(_groups(module)):
                kernel_parts = len(linears) > 1 and isinstance(linears[0], KernelLinear)  # loaded unfused
                if not isinstance(linears[0], QuantLinear) and not kernel_parts:
                    continue
                new = _kernel_linear(linears)
                if fused is None:
                    name = next(n for n, m in module.named_children() if m is linears[0])
                    setattr(module, name, new)
                else:
                    for part in dict(FUSIONS)[fused]:
                        if hasattr(module, part):
                            delattr(module, part)
                    setattr(module, fused, new)
                changed += len(linears)
                del linears, new
            # the parts' freed blocks lie below the fused copies: glibc keeps them resident until a trim,
            # and no later (larger) fused tensor fits in them (1.7B w4 load: +720 MiB at the peak)
            release_free_heap()
    embed, head = model.model.embed_tokens, model.lm_head
    if isinstance(embed, QuantEmbedding):
        if embed.tied:
            table = KernelLinear(_table_weight(embed), head.bias if head is embed.table else None)
            model.lm_head = table
        else:
            table = KernelLinear(_table_weight(embed))
        model.model.embed_tokens = KernelEmbedding(table, embed.dtype, embed.tied, embed.lookup_scale)
        changed += 1
    if isinstance(model.lm_head, QuantLinear):
        model.lm_head = _kernel_linear([model.lm_head])
        changed += 1
    return changed
