"""The batch-1 decode ceiling on this machine (issue 3): engine vs weight-matmuls-only vs read bandwidth.

    python benchmarks/decode_ceiling.py [--dtype bfloat16] [--threads 2]

Sets the ceilings against transformers' batch-1 rate from benchmarks/results/engine_bench_<dtype>.json
(run benchmarks/engine_bench.py first) and writes benchmarks/results/decode_ceiling_<dtype>.json.
With benchmarks/results/engine_bench_quant.json present (engine_bench.py --variants ...), it also lists the
fraction of the read-bandwidth roofline (bandwidth / weight bytes streamed per token) that each weight
variant's batch-1 decode reached, against this run's bandwidth probe.
"""

import argparse
import json
from pathlib import Path

import torch

from slimlm.bench.ceiling import decode_ceiling
from slimlm.bench.workload import make_prompts
from slimlm.engine.llm import LLM

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--weights-layout", default="plain", help="plain (what batch-1 commands use) | packed | both"
    )
    ap.add_argument("--decode-kernel", default="auto", help="the engine row's decode steps: auto | c | torch")
    ap.add_argument("--out", default=None, help="results file (default results/decode_ceiling_<dtype>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(None, dtype=args.dtype, device="cpu", kv_cache_tokens=1024, progress=False,
              weights_layout=args.weights_layout, decode_kernel=args.decode_kernel)  # fmt: skip
    prompt = make_prompts(llm.tokenizer, 1, 128)[0]
    r = decode_ceiling(llm, prompt)
    bench = RESULTS / f"engine_bench_{args.dtype}.json"
    hf = None
    if bench.exists():
        hf = json.loads(bench.read_text())["systems"].get("transformers", {}).get("decode_tok_s")
    r["transformers_decode_tok_s"] = hf
    r["decode_kernel"] = llm.engine.decode_backend
    print(
        f"{r['dtype']}, {r['threads']} threads, {r['weight_bytes'] / 2**20:.0f} MiB of weights read per token"
    )
    print(
        f"read bandwidth (torch.sum): {r['read_bandwidth_gb_s']:.1f} GB/s; "
        f"weight matmuls stream at {r['matmul_bandwidth_gb_s']:.1f} GB/s"
    )
    rows = [
        (f"slimlm engine, batch-1 decode ({r['decode_kernel']})", r["engine_decode_tok_s"]),
        ("torch's weight matmuls only (no attention, norms, Python)", r["matmul_only_tok_s"]),
        ("read bandwidth / weight bytes", r["bandwidth_bound_tok_s"]),
    ]
    print(f"{'':60s} {'tok/s':>8s} {'vs transformers':>16s}")
    for name, rate in rows:
        ratio = f"{rate / hf:.2f}x" if hf else "n/a"
        print(f"{name:60s} {rate:8.1f} {ratio:>16s}")
    quant = RESULTS / "engine_bench_quant.json"
    if quant.exists():
        bandwidth = r["read_bandwidth_gb_s"] * 1e9
        r["variants"] = {}
        print(
            f"{'weight variant (engine_bench_quant.json)':42s} {'MiB/token':>9s} {'tok/s':>7s} {'roofline':>8s} {'fraction':>8s}"
        )
        for name, v in json.loads(quant.read_text())["variants"].items():
            if "bytes_per_token" not in v:
                continue
            roof = bandwidth / v["bytes_per_token"]
            r["variants"][name] = {"bytes_per_token": v["bytes_per_token"], "decode_tok_s": v["decode_tok_s"],
                                   "roofline_tok_s": roof, "roofline_fraction": v["decode_tok_s"] / roof}  # fmt: skip
            print(f"{name:42s} {v['bytes_per_token'] / 2**20:9.1f} {v['decode_tok_s']:7.1f} {roof:8.1f} "
                  f"{v['decode_tok_s'] / roof:8.2f}")  # fmt: skip
    suffix = "" if args.threads == 2 else f"_threads{args.threads}"
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"decode_ceiling_{args.dtype}_{args.weights_layout}{suffix}.json"
    )
    out.write_text(json.dumps(r, indent=2))
    print(f"wrote {out}")
