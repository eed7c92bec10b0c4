"""Does torch.compile help CPU decode? (issue 3 asks to try it.) Eager vs compiled, measured here.

    python benchmarks/compile_trial.py                 # the decode step's elementwise pieces, eager vs compiled
    python benchmarks/compile_trial.py --whole-model   # also the whole model forward (inductor, freezing; minutes)

Writes benchmarks/results/compile_trial.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimlm.models.llama import RMSNorm
from slimlm.models.rope import apply_rotary

RESULTS = Path(__file__).parent / "results"


def per_call_us(fn, *args, calls: int = 2000) -> float:
    for _ in range(50):
        fn(*args)
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls * 1e6


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def pieces(rows: int, dtype: torch.dtype) -> dict[str, tuple]:
    """SmolLM2's shapes: hidden 576, 9 + 3 rotated heads of 64, intermediate 1536."""
    norm = RMSNorm(576, 1e-5).to(dtype)
    x = torch.randn(rows, 576, dtype=dtype)
    cos, sin = torch.randn(rows, 64, dtype=dtype), torch.randn(rows, 64, dtype=dtype)

    def add_norm(x, residual):
        x = x + residual
        return x, norm(x)

    return {
        "rmsnorm": (norm.forward, x),
        "residual add + rmsnorm": (add_norm, x, x),
        "rotary (q and k)": (apply_rotary, torch.randn(rows, 12, 64, dtype=dtype), cos, sin),
        "silu * up": (silu_mul, torch.randn(rows, 3072, dtype=dtype)),
    }


def op_level(dtype: torch.dtype) -> list[dict]:
    rows_out = []
    with torch.inference_mode():
        for rows in (1, 16):
            for name, (fn, *args) in pieces(rows, dtype).items():
                eager = per_call_us(fn, *args)
                compiled_fn = torch.compile(fn, dynamic=False)
                start = time.perf_counter()
                compiled_fn(*args)
                compile_s = time.perf_counter() - start
                compiled = per_call_us(compiled_fn, *args)
                rows_out.append(
                    {
                        "piece": name,
                        "tokens": rows,
                        "eager_us": eager,
                        "compiled_us": compiled,
                        "compile_s": compile_s,
                    }  # fmt: skip
                )
                print(f"{name:24s} T={rows:2d}  eager {eager:6.1f} us  compiled {compiled:6.1f} us  "
                      f"(compile {compile_s:.1f} s)")  # fmt: skip
    return rows_out


def whole_model(dtype: str) -> dict:
    """inductor over the whole forward, weights frozen (inductor packs them itself, so no prepack)."""
    import torch._inductor.config as inductor_config

    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams

    inductor_config.freezing = True
    llm = LLM(None, dtype=dtype, device="cpu", kv_cache_tokens=1024, progress=False, weights_layout="plain")
    prompt = "Write a long story about a dragon who learns to code in Python."
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    results = {}
    for label in ("eager", "compiled"):
        if label == "compiled":
            model = llm.engine.runner.model
            model.forward = torch.compile(model.forward, dynamic=True)
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        warm_s = time.perf_counter() - start
        times = []
        for _ in range(2):
            start = time.perf_counter()
            llm.generate([prompt], params)
            times.append((time.perf_counter() - start) / 64 * 1000)
        results[label] = {"first_call_s": warm_s, "ms_per_token": statistics.median(times)}
        print(
            f"whole model {label:8s}: first call {warm_s:6.1f} s, {results[label]['ms_per_token']:.1f} ms/token"
        )
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whole-model", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"dtype": args.dtype, "threads": args.threads, "torch": torch.__version__}
    out["op_level"] = op_level(getattr(torch, args.dtype))
    if args.whole_model:
        out["whole_model"] = whole_model(args.dtype)
    path = RESULTS / "compile_trial.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
