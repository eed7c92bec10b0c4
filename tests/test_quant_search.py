"""Importance-weighted grid search (`--scale-search mse|imatrix`, slimlm/quant/search.py): the grids it
finds must beat each group's min/max grid on the weighted error they minimise, through the stored
codes; GPTQ must gain from it; a tiny model quantized with it must be closer to the float model."""

from __future__ import annotations

import copy

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.quant.gptq import gptq_quantize
from slimlm.quant.quantize import quantize_model
from slimlm.quant.rtn import rtn_quantize
from slimlm.quant.search import importance_for
from slimlm.quant.stats import InputStats
from tests.tiny_models import make_hf_model

SCHEMES = [  # (bits, group size, sym, float zero)
    (4, 32, False, False),
    (4, 64, False, True),
    (8, 64, True, False),
    (8, -1, True, False),
]


def _weighted_group_errors(w_hat, w, imp, group_size):
    """Σ imp·(ŵ − w)² per (row, group), computed here from the dequantized weights."""
    out, n_in = w.shape
    gs = n_in if group_size == -1 else group_size
    return ((w_hat - w) ** 2 * imp).view(out, n_in // gs, gs).sum(-1)


@pytest.mark.parametrize("bits,group_size,sym,float_zero", SCHEMES)
def test_searched_grid_beats_min_max_on_the_weighted_error(bits, group_size, sym, float_zero):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * (torch.rand(256, generator=g) + 0.2)
    w[::7, ::11] *= 6  # outliers: min/max grids waste levels on them
    imp = torch.rand(256, generator=g) ** 4 + 1e-3  # heavy-tailed, as activations' mean squares are
    minmax = rtn_quantize(w, bits, group_size, sym, float_zero)
    searched = rtn_quantize(w, bits, group_size, sym, float_zero, importance=imp)
    unweighted = rtn_quantize(w, bits, group_size, sym, float_zero, importance=torch.ones(256))
    err_minmax = _weighted_group_errors(minmax.dequantize(), w, imp, group_size)
    err_searched = _weighted_group_errors(searched.dequantize(), w, imp, group_size)
    err_unweighted = _weighted_group_errors(unweighted.dequantize(), w, imp, group_size)
    # never worse in any group (the min/max grid is the first candidate), and clearly better overall
    assert (err_searched <= err_minmax * (1 + 1e-5) + 1e-9).all()
    assert err_searched.sum() < 0.92 * err_minmax.sum(), (err_searched.sum(), err_minmax.sum())
    # the importance matters: the unweighted search is worse on the weighted error
    assert err_searched.sum() < err_unweighted.sum()
    # ... and the unweighted search wins on the plain squared error it minimises
    plain = lambda q: float(((q.dequantize() - w) ** 2).sum())  # noqa: E731
    assert plain(unweighted) < plain(minmax)
    # the stored format is unchanged: integer zero points stay integers in range
    assert searched.zeros.dtype == minmax.zeros.dtype
    if not float_zero:
        assert int(searched.zeros.min()) >= 0 and int(searched.zeros.max()) <= 2**bits - 1
    assert searched.scales.shape == minmax.scales.shape and (searched.scales > 0).all()


@pytest.mark.parametrize("float_zero", [False, True])
@pytest.mark.parametrize("scale_search", ["mse", "imatrix"])
def test_gptq_takes_its_grids_from_the_search_weighted_by_the_hessian_diagonal(scale_search, float_zero):
    # Uncorrelated inputs (a diagonal Hessian) leave GPTQ nothing to push onto later columns, so it must
    # reduce to RTN on the searched grids, with the Hessian diagonal (E[x_j²]) as the importance.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[::5, ::13] *= 5
    mean_square = torch.rand(128, generator=g) ** 3 + 0.01
    hessian = torch.diag(2 * mean_square)
    gptq = gptq_quantize(w, hessian, 4, 32, float_zero=float_zero, scale_search=scale_search)
    imp = importance_for(scale_search, 128, hessian / 2)
    rtn = rtn_quantize(w, 4, 32, float_zero=float_zero, importance=imp)
    minmax = gptq_quantize(w, hessian, 4, 32, float_zero=float_zero)
    torch.testing.assert_close(gptq.scales, rtn.scales)
    torch.testing.assert_close(gptq.zeros.float(), rtn.zeros.float())
    assert (gptq.codes == rtn.codes).float().mean() > 0.999
    assert not torch.equal(gptq.scales, minmax.scales)  # the search did change the grids


def test_imatrix_importance_is_the_inputs_mean_square():
    x = torch.randn(500, 48) * torch.linspace(0.1, 3, 48)
    imp = importance_for("imatrix", 48, InputStats.of(x).gram)
    torch.testing.assert_close(imp, x.pow(2).mean(0), rtol=1e-4, atol=1e-6)
    assert importance_for("minmax", 48) is None
    assert torch.equal(importance_for("mse", 48), torch.ones(48))


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_model("llama")


def _kl(model, reference_logits, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    ref = torch.log_softmax(reference_logits.float(), -1)
    return float((ref.exp() * (ref - logp)).sum(-1).mean())


def test_tiny_model_is_closer_to_float_with_imatrix_rtn(hf_llama):
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 128, (2, 48), generator=g) for _ in range(3)]
    ids = torch.cat(calib)
    with torch.no_grad():
        reference = hf_llama(ids).logits
    kl = {}
    for search in ("minmax", "mse", "imatrix"):
        model = copy.deepcopy(hf_llama)
        config = quantize_model(model, "rtn", 4, 32, calib, progress=False, scale_search=search)
        assert config.get("scale_search", "minmax") == search
        assert ("calibration" in config) == (search == "imatrix")  # imatrix rtn calibrates, plain rtn not
        kl[search] = _kl(model, reference, ids)
    assert kl["imatrix"] < kl["minmax"] and kl["mse"] < kl["minmax"], kl


def test_bad_combinations_are_refused(hf_llama):
    model = copy.deepcopy(hf_llama)
    calib = [torch.randint(0, 128, (1, 16))]
    with pytest.raises(SlimlmError, match="unknown scale search 'l1'"):
        quantize_model(model, "rtn", 4, 32, calib, progress=False, scale_search="l1")
    with pytest.raises(SlimlmError, match="awq picks its grids by its own clipping search"):
        quantize_model(model, "awq", 4, 32, calib, progress=False, scale_search="imatrix")
    with pytest.raises(SlimlmError, match="--scale-search imatrix needs calibration data"):
        quantize_model(model, "rtn", 4, 32, None, progress=False, scale_search="imatrix")
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # refused calls change nothing
