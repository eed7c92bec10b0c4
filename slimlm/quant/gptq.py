"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's error onto the
columns not yet quantized through the inverse Hessian of the layer's reconstruction loss.

H = 2/n · Σ x xᵀ over the calibration activations, dampened by 1% of its mean diagonal, inverted via
Cholesky; updates are applied lazily in blocks of 128 columns. With act-order, columns are processed by
decreasing diag(H) and the groups are formed in that order; the result keeps that order in the codes and
records the input permutation (GPTQ checkpoints express the same thing as g_idx[perm[j]] = j // group).
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError
from slimlm.quant.rtn import group_qparams
from slimlm.quant.scheme import QuantizedWeight, check_scheme
from slimlm.quant.search import importance_for, search_qparams


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    float_zero: bool = False,
    scale_search: str = "minmax",
) -> QuantizedWeight:
    """Quantize `weight` [out, in] with GPTQ given the layer-input Hessian [in, in].

    `scale_search` (search.py): how each group's grid is chosen when GPTQ reaches the group, from the
    error-updated weights: their min/max, or the grid that minimises the squared ("mse") or the
    Hessian-diagonal-weighted ("imatrix") rounding error, before error feedback continues.
    """
    out, n_in = weight.shape
    group_size = check_scheme(bits, group_size, n_in)
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: any weight works, use 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h_inv_chol = _inverse_hessian_cholesky(h, damp)
    importance = importance_for(scale_search, n_in, h / 2)  # h = 2·E[x xᵀ], permuted with the columns

    codes = torch.zeros(out, n_in, dtype=torch.uint8, device=w.device)
    n_groups = n_in // group_size
    scales = torch.zeros(out, n_groups, device=w.device)
    zero_dtype = torch.float32 if float_zero and not sym else torch.int32
    zeros = torch.zeros(out, n_groups, dtype=zero_dtype, device=w.device)
    maxq = 2**bits - 1
    for start in range(0, n_in, block_size):
        end = min(start + block_size, n_in)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv_chol[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:
                # Group statistics from the error-updated weights (groups never straddle blocks when
                # block_size is a multiple of group_size; otherwise the tail comes from w).
                tail = max(0, col + group_size - end)
                group = torch.cat([block[:, i : i + group_size], w[:, end : end + tail]], dim=1)
                g = col // group_size
                if importance is None:
                    scales[:, g], zeros[:, g] = group_qparams(group, bits, sym, float_zero)
                else:
                    imp = importance[col : col + group_size].to(w.device)
                    scales[:, g], zeros[:, g] = search_qparams(group, imp, bits, sym, float_zero)
            g = col // group_size
            q = torch.clamp(torch.round(block[:, i] / scales[:, g] + zeros[:, g]), 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            dequant = (q - zeros[:, g]) * scales[:, g]
            err = (block[:, i] - dequant) / h_block[i, i]
            block[:, i:] -= err.unsqueeze(1) * h_block[i, i:].unsqueeze(0)  # rank-1 update within the block
            errors[:, i] = err
        w[:, end:] -= errors @ h_inv_chol[start:end, end:]  # lazy update of the remaining columns
    return QuantizedWeight(codes, scales, zeros, bits, group_size, perm)


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H); retries with more dampening."""
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], device=h.device)
    for attempt in range(4):
        lam = damp * (10**attempt) * mean_diag
        lower, info = torch.linalg.cholesky_ex(h + lam * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise SlimlmError(
        "GPTQ could not factor the Hessian of a layer even with 1000x dampening: "
        "use more calibration samples, or --method awq / rtn"
    )
