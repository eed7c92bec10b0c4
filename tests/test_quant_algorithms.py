"""GPTQ and AWQ on single layers: both must beat round-to-nearest where their assumptions hold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimlm.quant.awq import awq_quantize_layer, awq_search_clip, awq_search_scale, fold_scale
from slimlm.quant.gptq import gptq_quantize
from slimlm.quant.rtn import fake_quantize, rtn_quantize
from slimlm.quant.stats import InputStats


def _output_error(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w_hat - w).T).pow(2).mean())


def _correlated_inputs(n: int, dim: int, sample_seed: int = 0) -> torch.Tensor:
    """Rows from one fixed distribution (a low-rank mix plus noise); `sample_seed` picks the rows."""
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(dim // 8, dim, generator=g)
    scale = torch.rand(dim, generator=g) * 3 + 0.1  # channels of different magnitude
    g.manual_seed(sample_seed)
    latent = torch.randn(n, dim // 8, generator=g)
    return (latent @ mix + 0.1 * torch.randn(n, dim, generator=g)) * scale


def test_input_stats_are_running_means():
    x = torch.randn(300, 24) * torch.rand(24)
    stats = InputStats(24)
    for chunk in x.split(70):
        stats.add(chunk)
    torch.testing.assert_close(stats.hessian, 2 * x.T @ x / 300, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.abs_mean, x.abs().mean(0))
    scale = torch.rand(24) + 0.5
    stats.divide_inputs(scale)
    torch.testing.assert_close(stats.gram, InputStats.of(x / scale).gram, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, -1), (8, 64)])
def test_gptq_beats_rtn_on_correlated_inputs(act_order, bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = _correlated_inputs(1024, 128)
    q = gptq_quantize(w, InputStats.of(x).hessian, bits, group_size, act_order=act_order)
    rtn = rtn_quantize(w, bits, group_size)
    x_test = _correlated_inputs(512, 128, sample_seed=1)  # held out: the gain must generalise
    gptq_err = _output_error(q.dequantize(), w, x_test)
    rtn_err = _output_error(rtn.dequantize(), w, x_test)
    assert gptq_err < 0.7 * rtn_err, (gptq_err, rtn_err)
    assert (q.perm is not None) == act_order
    if act_order:
        assert torch.equal(torch.sort(q.perm).values, torch.arange(128))


def test_gptq_handles_dead_inputs():
    w = torch.randn(32, 64)
    x = torch.randn(256, 64)
    x[:, 5] = 0  # an input channel that never fires: H has a zero row and column
    q = gptq_quantize(w, InputStats.of(x).hessian, 4, 32)
    assert torch.isfinite(q.scales).all()
    assert float(q.dequantize()[:, 5].abs().max()) <= float(q.scales.max())  # zeroed, within a step


def _outlier_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    x[:, :4] *= 30  # a few salient channels, as in LLM activations
    return x


def test_awq_scale_search_beats_rtn_with_outlier_channels():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    x = _outlier_inputs(512, 128)
    scale = awq_search_scale(InputStats.of(x), [w], bits=4, group_size=64)
    assert scale[:4].mean() > scale[4:].mean()  # the salient channels get scaled up
    awq_w = fake_quantize(w * scale, 4, 64) / scale
    x_test = _outlier_inputs(512, 128, seed=1)
    assert _output_error(awq_w, w, x_test) < 0.8 * _output_error(fake_quantize(w, 4, 64), w, x_test)


def test_awq_clip_search_never_increases_group_error():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[:, 7] = 8.0  # an outlier weight stretches its group's range
    x = torch.randn(256, 128)
    max_val = awq_search_clip(w, InputStats.of(x), 4, 32)
    clipped = torch.maximum(torch.minimum(w.view(32, 4, 32), max_val[..., None]), -max_val[..., None])
    err_clip = _output_error(fake_quantize(clipped.view(32, 128), 4, 32), w, x)
    assert err_clip <= _output_error(fake_quantize(w, 4, 32), w, x) * (1 + 1e-6)
    assert bool((max_val <= w.view(32, 4, 32).abs().amax(-1) + 1e-6).all())


class _Block(nn.Module):
    """The shapes AWQ folds through: norm -> (q, k, v); v -> o; norm -> (gate, up); up -> down."""

    def __init__(self, dim=64, hidden=128):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(dim, elementwise_affine=True, bias=False)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(dim, dim, bias=name != "o_proj"))
        self.post_attention_layernorm = nn.LayerNorm(dim, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = (
            nn.Linear(dim, hidden, bias=False),
            nn.Linear(dim, hidden, bias=False),
        )
        self.mlp.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = self.input_layernorm(x)
        attn = self.self_attn.o_proj(self.self_attn.v_proj(h) * torch.sigmoid(self.self_attn.q_proj(h)))
        x = x + attn + 0 * self.self_attn.k_proj(h).sum()
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(torch.relu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


def test_awq_layer_folding_keeps_the_float_function():
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(128, 64)
    x[:, :3] *= 20  # salient channels make the q/k/v scale search pick a non-trivial scale
    reference = block(x)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in block.named_modules() if isinstance(m, nn.Linear)]  # fmt: skip
    block(x)
    for h in hooks:
        h.remove()
    by_tensor = {id(t): InputStats.of(t) for t in inputs.values()}  # q/k/v read one tensor: one stats
    stats = {name: by_tensor[id(t)] for name, t in inputs.items()}
    weights_before = {n: m.weight.clone() for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    quantized = awq_quantize_layer(block, stats, bits=4, group_size=32, clip=False)
    assert set(quantized) == set(weights_before)
    assert not torch.equal(block.self_attn.q_proj.weight, weights_before["self_attn.q_proj"])
    # Folding moved scales between producers and consumers without changing the float function.
    torch.testing.assert_close(block(x), reference, rtol=1e-4, atol=1e-4)


def test_fold_scale_into_a_linear_producer():
    torch.manual_seed(0)
    producer, consumer = nn.Linear(16, 32), nn.Linear(32, 8)
    x = torch.randn(5, 16)
    reference = consumer(producer(x))
    fold_scale(producer, [consumer], torch.rand(32) + 0.5)
    torch.testing.assert_close(consumer(producer(x)), reference)
