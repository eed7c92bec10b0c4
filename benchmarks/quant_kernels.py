"""Weight-only quantized matmul kernels vs float F.linear at SmolLM2-135M shapes (issue 5).

    python benchmarks/quant_kernels.py [--threads 2] [--group-size 64] [--reps 50] [--device cpu]

For each (in -> out) shape and M (tokens per call) it times, median over `reps` calls:
  fp32 / bf16 F.linear, the slimlm QuantLinear modules (fp32 in, fp32 out, as the model calls them),
  the raw kernels with bf16 activations and, for reference, the same kernels fed fp32 activations and
  the dequantize-then-matmul fallback. Writes benchmarks/results/quant_kernels_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimlm.quant.linear import DequantLinear, Int4TinyGemmLinear, Int8Linear
from slimlm.quant.rtn import rtn_quantize

SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 49152)]  # (in, out): attention, up/gate, down, lm_head


def _median_us(cases: dict, reps: int, device: str) -> dict[str, float]:
    """Round-robin over the cases (one call of each per round) so that load changes hit all alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in cases.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def bench_shape(n_in: int, n_out: int, m: int, group_size: int, reps: int, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in, device=device) * 0.02
    x = torch.randn(m, n_in, device=device)
    xb, wb = x.bfloat16(), w.bfloat16()
    int4 = Int4TinyGemmLinear(rtn_quantize(w, 4, group_size), None)
    int8 = Int8Linear(rtn_quantize(w, 8, -1, sym=True), None)
    int8_grouped = DequantLinear(rtn_quantize(w, 8, group_size, sym=True), None)
    int4_dequant = DequantLinear(rtn_quantize(w, 4, group_size), None)
    ops = torch.ops.aten
    int4_mm = ops._weight_int4pack_mm_for_cpu if device == "cpu" else ops._weight_int4pack_mm
    sz = int4.scale_and_zero.view(torch.bfloat16)
    scales8 = int8.scales.view(torch.bfloat16)
    cases = {
        "fp32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear": lambda: F.linear(xb, wb),
        "W8 per-channel QuantLinear (int8pack_mm)": lambda: int8(x),
        "W8 kernel, bf16 act": lambda: ops._weight_int8pack_mm(xb, int8.weight_int8, scales8),
        f"W8 g{group_size} dequant+matmul": lambda: int8_grouped(x),
        f"W4 g{group_size} QuantLinear (int4pack_mm)": lambda: int4(x),
        "W4 kernel, bf16 act": lambda: int4_mm(xb, int4.packed, group_size, sz),
        f"W4 g{group_size} dequant+matmul": lambda: int4_dequant(x),
    }
    if device == "cpu":  # the CPU kernels also take fp32; shown to justify casting to bf16
        cases["W8 kernel, fp32 act"] = lambda: ops._weight_int8pack_mm(x, int8.weight_int8, scales8.float())
        cases["W4 kernel, fp32 act"] = lambda: int4_mm(x, int4.packed, group_size, sz.float())
    with torch.no_grad():
        return _median_us(cases, reps, device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)  # 128 does not divide SmolLM2's 576
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for n_in, n_out in SHAPES:
        for m in (1, 16):
            timings = bench_shape(n_in, n_out, m, args.group_size, args.reps, args.device)
            results.append({"in": n_in, "out": n_out, "M": m, "us": timings})
            print(f"\n{n_in} -> {n_out}, M={m} (median µs; ratio to fp32 F.linear)")
            base = timings["fp32 F.linear"]
            for name, us in timings.items():
                print(f"  {name:<44} {us:10.1f}  {base / us:6.2f}x")
    out = Path(__file__).parent / "results" / f"quant_kernels_{args.device}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "group_size": args.group_size,
        "reps": args.reps,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
