"""How fast can batch-1 decode get on this machine? The weight matmuls alone set the ceiling.

A decode step must read every weight once. This module times exactly that work with the engine's own
kernels (every linear of the loaded model at one token, lm_head included, back to back, nothing else)
and the machine's plain read bandwidth, and sets both against the engine's real decode step:

    matmul-only tok/s   = 1 / (time of the weight matmuls of one token): no engine can beat it with
                          these kernels, whatever it does about attention, norms or Python overhead
    bandwidth tok/s     = read bandwidth / weight bytes: no kernel can beat it at this weight size
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


def _linears_in_use(model: nn.Module) -> list[nn.Module]:
    """Every module that holds a linear weight the forward reads: packed, plain or quantized."""
    from slimlm.models.prepack import PackedLinear
    from slimlm.quant.linear import QuantLinear

    return [m for m in model.modules() if isinstance(m, (PackedLinear, nn.Linear, QuantLinear))]


def _weight_bytes(module: nn.Module) -> int:
    if hasattr(module, "packed_bytes"):  # oneDNN tensors do not report their storage the usual way
        return module.packed_bytes
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm: kernel selection, first-touch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s that torch.sum streams from memory (a tensor far larger than any cache)."""
    data = torch.ones(num_bytes // 4, dtype=torch.float32)
    return num_bytes / _median_seconds(data.sum, repeats)


@torch.inference_mode()
def weight_matmul_seconds(model: nn.Module, dtype: torch.dtype, repeats: int = 10) -> tuple[float, int]:
    """(seconds, bytes) of running every linear of `model` once on a single token, in model order."""
    linears = _linears_in_use(model)
    inputs = [torch.randn(1, m.in_features, dtype=dtype) for m in linears]

    def one_token() -> None:
        for module, x in zip(linears, inputs, strict=True):
            module(x)

    from slimlm.models.prepack import onednn_disabled

    with onednn_disabled():  # the kernels the engine's one-token steps use (see ModelRunner.run)
        seconds = _median_seconds(one_token, repeats)
    # A tied lm_head shares the embedding table: its bytes are read once per token, counted once.
    seen, total = set(), 0
    for module in linears:
        key = (
            module.weight.data_ptr()
            if isinstance(getattr(module, "weight", None), torch.Tensor)
            else id(module)
        )
        if key not in seen:
            seen.add(key)
            total += _weight_bytes(module)
    return seconds, total


def decode_ceiling(llm, prompt: list[int], decode_tokens: int = 64, repeats: int = 10) -> dict[str, Any]:
    """Compare the engine's batch-1 decode with the matmul-only and bandwidth ceilings."""
    from slimlm.bench.peers import SlimlmRunner

    model = llm.engine.runner.model
    dtype = next(model.parameters()).dtype
    matmul_s, weight_bytes = weight_matmul_seconds(model, dtype, repeats)
    runner = SlimlmRunner(llm)
    runner.first_and_rate(prompt[:16], 4)  # warm-up
    rates = [runner.first_and_rate(prompt, decode_tokens)[1] for _ in range(3)]
    bandwidth = read_bandwidth()
    decode_rate = statistics.median(rates)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "weight_bytes": weight_bytes,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "weight_matmul_ms": matmul_s * 1000,
        "matmul_bandwidth_gb_s": weight_bytes / matmul_s / 1e9,
        "engine_decode_ms": 1000 / decode_rate,
        "engine_decode_tok_s": decode_rate,
        "matmul_only_tok_s": 1 / matmul_s,
        "bandwidth_bound_tok_s": bandwidth / weight_bytes,
    }
