"""Grid search for each group's scale and zero point: importance-weighted rounding (`--scale-search`).

RTN and GPTQ take each group's grid from its minimum and maximum (rtn.group_qparams). That grid wastes
levels on a lone outlier and treats every input column alike. The search here picks, per group, the
scale s and zero point z that minimise the importance-weighted error

    Σ_i imp_i · (w_i − s·(q_i − z))²,   q_i = clamp(round(w_i / s + z), 0, 2^bits − 1)

as llama.cpp does with an importance matrix (its `make_qkx3_quants` for Q4_1 blocks): candidate inverse
scales about (2^bits − 1) / (max − min), ±6% in 37 steps, round the group; for each rounding
the best scale (and, with float zero points, the best minimum) is the weighted least-squares fit to those
codes; the candidate with the lowest weighted error after re-rounding wins. The min/max grid is the first
candidate, so the result is never worse than it on the weighted error.

Importances (`importance_for`): "mse" weighs every weight alike (GPTQ's `--mse` / ExLlama's grid
search); "imatrix" weighs input column j by E[x_j²] over the calibration activations (the diagonal of the
layer's E[x xᵀ]), llama.cpp's importance matrix: an error on a column that sees large inputs costs more
output error.
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError
from slimlm.quant.kernel_scales import round_significant, scale_bits_for
from slimlm.quant.rtn import group_qparams

SCALE_SEARCHES = ("minmax", "mse", "imatrix")
# llama.cpp's candidate range for 4-bit blocks with an importance matrix (quantize_row_q4_1_impl):
# inverse scales from (15 - 0.9) / range to (15 + 0.9) / range in 37 steps; here as the same relative
# range (±6%) at any bits, (2^bits - 1)·(1 + (rmin + k·rdelta) / 15) / range, so 8 bits get more than
# ±0.35% of a step.
RMIN, RDELTA, STEPS = -0.9, 0.05, 36


def check_scale_search(scale_search: str) -> str:
    if scale_search not in SCALE_SEARCHES:
        raise SlimlmError(
            f"unknown scale search {scale_search!r}: use minmax (each group's min/max), mse (least squared "
            "error per group) or imatrix (error weighted by the calibration inputs' mean square)"
        )
    return scale_search


def importance_for(scale_search: str, n_in: int, gram: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per-input-column importance [n_in] for `scale_search`; None for min/max grids.

    `gram`: E[x xᵀ] of the layer's inputs (stats.InputStats.gram), needed by "imatrix".
    """
    check_scale_search(scale_search)
    if scale_search == "minmax":
        return None
    if scale_search == "mse":
        return torch.ones(n_in)
    if gram is None:
        raise SlimlmError("--scale-search imatrix needs calibration activations for every quantized linear")
    imp = torch.diagonal(gram).float().clone()
    # a column that never saw input: any value works; a tiny weight keeps the least squares well posed
    return imp.clamp(min=imp.max().clamp(min=1e-12) * 1e-6)


def weighted_error(
    w: torch.Tensor, imp: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Σ imp·(w − dequant(quant(w)))² per group; w [..., gs], imp broadcastable, scale/zero [...]."""
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    q = torch.clamp(torch.round(w / s + z), 0, 2**bits - 1)
    return (imp * ((q - z) * s - w) ** 2).sum(-1)


@torch.no_grad()
def search_qparams(
    w: torch.Tensor,
    imp: torch.Tensor,
    bits: int,
    sym: bool,
    float_zero: bool = False,
    steps: int = STEPS,
    rmin: float = RMIN,
    rdelta: float = RDELTA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [...] for groups w [..., gs] minimising the `imp`-weighted error.

    Same conventions as rtn.group_qparams (integer zeros in [0, 2^bits − 1] unless `float_zero`;
    symmetric: z = 2^(bits−1)); `imp` [gs] or [..., gs], non-negative.
    """
    maxq = 2**bits - 1
    w = w.float()
    imp = imp.float().expand_as(w)
    float_zero = float_zero and not sym
    best_s, best_z = group_qparams(w, bits, sym, float_zero)
    best_z = best_z.float()
    best_err = weighted_error(w, imp, best_s, best_z, bits)
    if float_zero:
        lo, hi = w.amin(-1), w.amax(-1)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
    span = hi - lo
    live = span > 0
    span = torch.where(live, span, torch.ones_like(span))
    # Each candidate's error is taken at its least-squares fit with its own codes; re-rounding under the
    # fitted grid, as the stored codes are, can only lower it, so the winner's real error is at most the
    # one compared here. (Summed directly: Σ imp·w² − s·Σ imp·w·q loses the 8-bit errors to cancellation.)
    sum_w, sum_x = imp.sum(-1), (imp * w).sum(-1)
    shifted = w - lo.unsqueeze(-1) if float_zero else w
    for k in range(steps + 1):
        iscale = maxq * (1 + (rmin + rdelta * k) / 15) / span
        q = torch.round(shifted * iscale.unsqueeze(-1))
        if float_zero:
            q = q.clamp_(0, maxq)
            iq = imp * q
            sum_l, sum_l2, sum_xl = iq.sum(-1), (iq * q).sum(-1), (iq * w).sum(-1)
            det = sum_w * sum_l2 - sum_l * sum_l
            ok = det > 0
            safe = torch.where(ok, det, torch.ones_like(det))
            scale = (sum_w * sum_xl - sum_x * sum_l) / safe
            minimum = (sum_l2 * sum_x - sum_l * sum_xl) / safe
            err = (imp * (q * scale.unsqueeze(-1) + minimum.unsqueeze(-1) - w) ** 2).sum(-1)
            zero = -minimum / torch.where(scale > 0, scale, torch.ones_like(scale))
        else:
            if sym:
                zero = torch.full_like(lo, 2 ** (bits - 1))
            else:
                zero = torch.clamp(torch.round(-lo * iscale), 0, maxq)
            c = (q + zero.unsqueeze(-1)).clamp_(0, maxq).sub_(zero.unsqueeze(-1))
            ic = imp * c
            denom, sum_xc = (ic * c).sum(-1), (ic * w).sum(-1)
            ok = denom > 0
            scale = sum_xc / torch.where(ok, denom, torch.ones_like(denom))
            err = (imp * (c * scale.unsqueeze(-1) - w) ** 2).sum(-1)
        better = ok & live & (scale > 0) & torch.isfinite(scale) & torch.isfinite(zero) & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, scale, best_s)
        best_z = torch.where(better, zero, best_z)
    # the winner moved onto fp16-exact d and m (kernel_scales.py) can lose to the min/max grid, which
    # group_qparams rounded the same way: keep whichever is better after rounding
    first_s, first_z = group_qparams(w, bits, sym, float_zero)
    best_s, best_z = fp16_exact(best_s, best_z, bits, sym, float_zero, w.shape[-1])
    worse = weighted_error(w, imp, best_s, best_z.float(), bits) > weighted_error(
        w, imp, first_s, first_z.float(), bits
    )
    return torch.where(worse, first_s, best_s), torch.where(worse, first_z, best_z)


def fp16_exact(
    scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool, float_zero: bool, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fitted grid moved onto fp16-exact d and m (kernel_scales.py), as rtn.group_qparams makes them;
    the caller quantizes the codes against it."""
    if float_zero:  # stored through PyTorch's bf16 (scale, minimum) pairs: left as fitted
        return scale, zero
    keep = scale_bits_for(bits, sym, group)
    if keep is not None:
        scale = round_significant(scale, keep)
    return scale, zero.round().to(torch.int32)


def searched_qparams(
    weight: torch.Tensor, importance: torch.Tensor, bits: int, group_size: int, sym: bool, float_zero: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """search_qparams over a whole weight [out, in] in groups of `group_size`; importance [in]."""
    out, n_in = weight.shape
    n_groups = n_in // group_size
    groups = weight.float().view(out, n_groups, group_size)
    imp = importance.float().to(weight.device).view(1, n_groups, group_size)
    return search_qparams(groups, imp, bits, sym, float_zero)
