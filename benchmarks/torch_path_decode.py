"""Decode speed of quantized checkpoints on the PyTorch path (`--decode-kernel torch`) against bf16.

    /work/wt/bin/quiet python benchmarks/torch_path_decode.py [--variants bf16,w4g64,w8] [--runs 3]

The PyTorch path is what CUDA, CPUs without AVX512-VNNI / AVX512-BF16 and `--decode-kernel torch` run.
Each variant is loaded as a user would (`LLM(path, decode_kernel="torch")`, default engine settings) in
its own process (its own peak RSS), then: batch 1 = greedy decode tok/s of one 128-token prompt for
`--gen-len` tokens (after the first token); 16-way = generated tokens/s of 16 such prompts submitted
together (prefill included, as benchmarks/engine_bench.py counts it). Medians of `--runs` after a
warm-up; `--threads` torch threads. Variants: bf16 (the embedded GGUF dequantized), w4g64
(`slimlm quantize --bits 4 --group-size 64`), w8 (`slimlm quantize --bits 8`, the default recipe: int8
g64 linears, int8 g32 tied table), w8ch (`--bits 8 --group-size -1`: per-channel, float table);
checkpoints come from slimlm.bench.variants' cache (quantized once). Writes
benchmarks/results/torch_path_decode.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = {"bf16": None, "w4g64": "w4g64", "w8": "w8", "w8ch": ("8", "-1")}


def model_path(variant: str, cache: Path) -> str | None:
    from slimlm.bench import variants

    spec = VARIANTS[variant]
    if spec is None:
        return None
    if isinstance(spec, tuple):  # a recipe slimlm.bench.variants does not list
        variants.CHECKPOINTS.setdefault(variant, spec)
        spec = variant
    return str(variants.checkpoint(spec, cache))


def measure(variant: str, cache: Path, runs: int, gen_len: int, prompt_len: int) -> dict:
    import torch

    from slimlm.bench.peers import SlimlmRunner
    from slimlm.bench.workload import make_prompts
    from slimlm.engine.llm import LLM

    path = model_path(variant, cache)
    llm = LLM(path, dtype="bfloat16", device="cpu", decode_kernel="torch", progress=False,
              kv_cache_tokens=17 * (prompt_len + gen_len + 16))  # fmt: skip
    prompts = make_prompts(llm.tokenizer, 17, prompt_len)
    runner = SlimlmRunner(llm)
    runner.first_and_rate(prompts[0][:16], 4)  # warm-up
    runner.throughput([p[:16] for p in prompts[1:]], 4)
    single, batch = [], []
    for _ in range(runs):
        single.append(runner.first_and_rate(prompts[0], gen_len)[1])
        batch.append(runner.throughput(prompts[1:], gen_len))
    report = llm.memory_report()
    return {
        "variant": variant,
        "model": path or "embedded SmolLM2-135M (GGUF dequantized to bf16)",
        "weights": report["weights_format"],
        "weights_bytes": report["weights_bytes"],
        "decode_kernel": report["decode_kernel"],
        "threads": torch.get_num_threads(),
        "batch1_tok_s": statistics.median(single),
        "batch16_tok_s": statistics.median(batch),
        "runs": {"batch1_tok_s": single, "batch16_tok_s": batch},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="bf16,w4g64,w8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path.home() / ".cache/slimlm/bench"))
    ap.add_argument("--out", default="benchmarks/results/torch_path_decode.json")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one variant, JSON out
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        row = measure(args.one, Path(args.cache), args.runs, args.gen_len, args.prompt_len)
        print(json.dumps(row))
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --variants {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    for name in names:  # quantize first (CPU-heavy, not timed) so the timed runs follow each other
        model_path(name, Path(args.cache))
    rows = {}
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--runs", str(args.runs), "--gen-len", str(args.gen_len),
               "--prompt-len", str(args.prompt_len), "--threads", str(args.threads), "--cache", args.cache]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base = rows.get("bf16")
    print(
        f"{'variant':8} {'weights MB':>10} {'batch-1 tok/s':>14} {'16-way tok/s':>13} {'peak RSS MiB':>12}  format"
    )
    for name, r in rows.items():
        if base:
            r["batch1_vs_bf16"] = r["batch1_tok_s"] / base["batch1_tok_s"]
            r["batch16_vs_bf16"] = r["batch16_tok_s"] / base["batch16_tok_s"]
        ratio1 = f" ({r['batch1_vs_bf16']:.2f}x)" if base else ""
        ratio16 = f" ({r['batch16_vs_bf16']:.2f}x)" if base else ""
        print(f"{name:8} {r['weights_bytes'] / 1e6:10.1f} {r['batch1_tok_s']:7.1f}{ratio1:>8} "
              f"{r['batch16_tok_s']:6.1f}{ratio16:>8} {r['peak_rss_bytes'] / 2**20:12.0f}  {r['weights']}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"threads": args.threads, "runs": args.runs, "gen_len": args.gen_len, "prompt_len": args.prompt_len,
                "clock": "wall", "decode_kernel": "torch"}  # fmt: skip
    out.write_text(json.dumps({"settings": settings, "variants": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
