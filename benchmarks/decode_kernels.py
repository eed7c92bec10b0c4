"""The kernel choices behind CPU decode, measured: linear layouts by rows per step, and one-token attention.

    python benchmarks/decode_kernels.py [--threads 2]

1. Every linear of SmolLM2's 30 layers (q/k/v fused, o, gate/up fused, down; 212 MB in bf16) at 1..128
   rows: oneDNN on prepacked weights, `F.linear` on plain weights with oneDNN (reorders per call), and
   torch's own kernels on plain weights with oneDNN off (its bf16 GEMV at one row).
2. The tied lm_head (49152 x 576) the same three ways.
3. One-token attention over 192 cached tokens (9 query heads, 3 KV heads): the bf16 two-matmul path
   with oneDNN on and off, and float32 SDPA over the upcast context.

Writes benchmarks/results/decode_kernels.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimlm.kv.attention import _attend_decode_matmul, attend_decode_batch, decode_mask
from slimlm.models.prepack import onednn_disabled

RESULTS = Path(__file__).parent / "results"
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def linear_ways(weights: list[torch.Tensor], rows: int) -> dict[str, float]:
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    xs = [torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights]

    def run_packed():
        for p, x in zip(packed, xs, strict=True):
            torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    def run_plain():
        for w, x in zip(weights, xs, strict=True):
            F.linear(x, w)

    out = {"onednn_packed_ms": median_ms(run_packed), "onednn_plain_ms": median_ms(run_plain)}
    with onednn_disabled():
        out["torch_plain_ms"] = median_ms(run_plain, repeats=3 if rows > 4 else 5)
    return out


def attention_ways(length: int = 192) -> dict[str, float]:
    q = torch.randn(1, 9, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(3, 1, length, 64, dtype=torch.bfloat16) for _ in range(2))
    mask = decode_mask(torch.tensor([length]), length, None)
    calls = 500

    def per_call_us(fn):
        return median_ms(lambda: [fn() for _ in range(calls)]) * 1000 / calls

    out = {"bf16_matmuls_onednn_on_us": per_call_us(lambda: _attend_decode_matmul(q, k, v, mask, 0.125))}
    with onednn_disabled():
        out["bf16_matmuls_onednn_off_us"] = per_call_us(lambda: _attend_decode_matmul(q, k, v, mask, 0.125))
        out["fp32_sdpa_onednn_off_us"] = per_call_us(lambda: attend_decode_batch(q, k, v, None, 0.125))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {"threads": args.threads, "linears": {}, "lm_head": {}}
    with torch.inference_mode():
        layers = [torch.randn(o, i, dtype=torch.bfloat16) for o, i in LAYER_SHAPES] * 30
        mb = sum(w.numel() * 2 for w in layers) / 1e6
        print(f"30 layers of linears ({mb:.0f} MB bf16), ms per step")
        print(f"{'rows':>5} {'oneDNN packed':>14} {'oneDNN plain':>13} {'torch plain':>12}")
        for rows in (1, 2, 4, 16, 128):
            r = results["linears"][rows] = linear_ways(layers, rows)
            print(
                f"{rows:5d} {r['onednn_packed_ms']:14.2f} {r['onednn_plain_ms']:13.2f} {r['torch_plain_ms']:12.2f}"
            )
        del layers
        head = [torch.randn(49152, 576, dtype=torch.bfloat16)]
        print("tied lm_head (57 MB bf16), ms per step")
        for rows in (1, 16):
            r = results["lm_head"][rows] = linear_ways(head, rows)
            print(
                f"{rows:5d} {r['onednn_packed_ms']:14.2f} {r['onednn_plain_ms']:13.2f} {r['torch_plain_ms']:12.2f}"
            )
        results["attention_one_token"] = attention_ways()
        print("one-token attention over 192 tokens, us per layer:")
        for name, us in results["attention_one_token"].items():
            print(f"  {name:28s} {us:7.1f}")
    path = RESULTS / "decode_kernels.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
