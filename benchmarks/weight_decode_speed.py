"""Batch-1 decode tok/s of each weight layout in docs/quantization.md's fidelity tables (issue 19).

    python benchmarks/weight_decode_speed.py --prepare          # make the checkpoints (CPU-heavy, once)
    /work/wt/bin/quiet python benchmarks/weight_decode_speed.py [--runs 5] [--threads 2]

The speed of a quantized checkpoint depends on its layout (bits, group sizes, table bits, an untied
head), not on the method that chose its codes: RTN, GPTQ, AWQ + GPTQ and the grid searches write the
same tensors. So one RTN checkpoint per layout (`slimlm quantize`, cached under --cache) stands for
every variant of that layout; `layout_of` in benchmarks/weight_fidelity.py maps each variant to one.
Float zero points run the same kernel layout (w = d·code + m per group) and are not measured apart.
llama.cpp's files run on slimlm's C kernel with `--weights native` (their own blocks). Each layout
decodes `--gen-len` greedy tokens after a 128-token prompt through the engine (the C kernel where it
runs; the backend is recorded), `--runs` times after a warm-up; the median is reported, with bf16 in the
same run. Writes benchmarks/results/weight_decode_speed.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIX_KERNEL = ",".join(
    ["self_attn.q_proj=32", "self_attn.k_proj=32", "self_attn.v_proj=32"]
    + [f"{i}.mlp.down_proj=32" for i in (*range(6), *range(24, 30))]
)
MIX_BUDGET = ",".join(
    ["self_attn.v_proj=32", "self_attn.k_proj=32"]
    + [f"{i}.mlp.down_proj=32" for i in (*range(12), *range(19, 30))]
)
# layout -> `slimlm quantize` arguments (RTN), or a llama.cpp quantization type, or None (the GGUF as bf16)
LAYOUTS = {
    "bf16": None,
    "w4-g64": ["--bits", "4", "--group-size", "64"],
    "w4-g64-e8": ["--bits", "4", "--group-size", "64", "--embedding-bits", "8"],
    "w4-g64-rot": ["--bits", "4", "--group-size", "64", "--rotate", "hadamard"],
    "w4-g64-e8-rot": ["--bits", "4", "--group-size", "64", "--embedding-bits", "8", "--rotate", "hadamard"],
    "w4-g32": ["--bits", "4", "--group-size", "32"],
    "w4-g32-e8": ["--bits", "4", "--group-size", "32", "--embedding-bits", "8"],
    "w4-g32-e8-rot": ["--bits", "4", "--group-size", "32", "--embedding-bits", "8", "--rotate", "hadamard"],
    "w4-g64-e8-mixb": ["--bits", "4", "--group-size", "64", "--embedding-bits", "8", "--group-sizes", MIX_BUDGET],
    "w4-g64-e8-mixk": ["--bits", "4", "--group-size", "64", "--embedding-bits", "8", "--group-sizes", MIX_KERNEL],
    "w8-channel": ["--bits", "8", "--group-size", "-1"],
    "w8-g64": ["--bits", "8", "--group-size", "64"],
    "w8-g32": ["--bits", "8", "--group-size", "32"],
    "llama.cpp-Q4_0": "Q4_0",
    "llama.cpp-Q4_K_M": "Q4_K_M",
}  # fmt: skip


def checkpoint(layout: str, cache: Path, llama_bin: Path) -> tuple[str | None, str]:
    """(model path, weights mode) for `layout`, quantizing it first if it is not cached."""
    spec = LAYOUTS[layout]
    if spec is None:
        return None, "float"
    if isinstance(spec, str):
        from benchmarks.weight_fidelity import llama_cpp_variant

        path = llama_cpp_variant(spec, llama_bin, Path.home() / ".cache/slimlm/bench/requant")
        return (None if path is None else str(path)), "native"
    out = cache / f"smollm2-{layout}"
    if not (out / "config.json").exists():
        cmd = [
            sys.executable,
            "-m",
            "slimlm.cli",
            "quantize",
            "--method",
            "rtn",
            *spec,
            "--out",
            str(out),
            "-q",
        ]
        subprocess.run(cmd, check=True)
    return str(out), "float"


def decode_rate(model: str | None, weights: str, runs: int, gen_len: int) -> dict:
    from slimlm.bench.peers import SlimlmRunner
    from slimlm.bench.workload import make_prompts
    from slimlm.engine.llm import LLM

    llm = LLM(model, dtype="bfloat16", device="cpu", kv_cache_tokens=512, progress=False, weights=weights)
    prompt = make_prompts(llm.tokenizer, 1, 128)[0]
    runner = SlimlmRunner(llm)
    runner.first_and_rate(prompt[:16], 4)  # warm-up
    rates = [runner.first_and_rate(prompt, gen_len)[1] for _ in range(runs)]
    report = llm.memory_report()
    row = {"decode_tok_s": statistics.median(rates), "runs": rates, "weights": report["weights_format"],
           "weights_bytes": report["weights_bytes"], "decode_kernel": report["decode_kernel"]}  # fmt: skip
    del llm, runner
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--prepare", action="store_true", help="only make the checkpoints (no timing)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path.home() / ".cache/slimlm/bench/weight_layouts"))
    ap.add_argument("--llama-bin", default="/work/tools/llama-build/bin")
    ap.add_argument("--out", default="benchmarks/results/weight_decode_speed.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise SystemExit(f"unknown --layouts {', '.join(unknown)}: choose from {', '.join(LAYOUTS)}")
    cache, bin_dir = Path(args.cache), Path(args.llama_bin)
    paths = {name: checkpoint(name, cache, bin_dir) for name in names}
    if args.prepare:
        print(f"checkpoints ready under {cache}")
        return
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    saved["settings"] = {"threads": args.threads, "runs": args.runs, "gen_len": args.gen_len, "prompt_len": 128,
                         "batch": 1, "clock": "wall", "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    layouts = saved.setdefault("layouts", {})
    for name in names:
        model, weights = paths[name]
        if model is None and LAYOUTS[name] is not None:
            continue  # llama.cpp tool missing (message printed)
        layouts[name] = decode_rate(model, weights, args.runs, args.gen_len)
        print(
            f"{name:18s} {layouts[name]['decode_tok_s']:7.1f} tok/s  {layouts[name]['decode_kernel']}",
            flush=True,
        )
    base = layouts.get("bf16", {}).get("decode_tok_s")
    for row in layouts.values():
        if base:
            row["vs_bf16"] = row["decode_tok_s"] / base
    out.write_text(json.dumps(saved, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
