"""Where a variant's resident memory goes: RSS and its peak at each stage of engine_bench's workload.

    python benchmarks/rss_stages.py [--variants bf16,w4g64] [--out benchmarks/results/rss_stages.json]

Each variant runs in its own process (as in `engine_bench.py --variants`): import torch, import the
engine, LLM(...) (load + tokenizer + KV pool), the benchmark's prompts, one prefill step of 16 x 128
tokens, the 63 decode steps, then a second 16-way run. Per stage: RSS after it, the peak during it (VmHWM,
reset through /proc/self/clear_refs at each stage's start), anonymous / file-backed RSS, glibc's heap
(arena and its free bytes: freed memory still resident) and which heavy modules are imported. Linux only.
Memory, not time: run it under the CPU lock, not `quiet`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("transformers", "tokenizers", "torch._dynamo", "sympy", "triton", "gguf", "safetensors", "jinja2")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def child(
    variant: str, concurrency: int, prompt_len: int, gen_len: int, model_arg: str | None = None
) -> list[dict]:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    rows: list[dict] = []

    def stage(name: str) -> None:
        heap = libc.mallinfo2()
        rows.append({"stage": name, "rss": _status("VmRSS"), "peak": _status("VmHWM"), "anon": _status("RssAnon"),
                     "file": _status("RssFile"), "heap_arena": heap.arena, "heap_free": heap.fordblks,
                     "heavy_modules": [m for m in HEAVY if m in sys.modules]})  # fmt: skip
        Path("/proc/self/clear_refs").write_text("5")  # the next stage's peak starts from its own RSS

    Path("/proc/self/clear_refs").write_text("5")
    stage("python")
    import torch

    torch.set_num_threads(2)
    stage("import torch")
    from slimlm.engine.llm import LLM

    stage("import slimlm engine")
    from slimlm.bench.models import variant_model
    from slimlm.bench.variants import checkpoint
    from slimlm.bench.workload import make_prompts
    from slimlm.engine.params import SamplingParams

    model, weights = variant_model(
        variant, model_arg, Path.home() / ".cache" / "slimlm" / "bench", checkpoint
    )
    kv_tokens = (concurrency + 1) * (prompt_len + gen_len + 16)  # as slimlm/bench/variants.py
    llm = LLM(
        model, dtype="bfloat16", device="cpu", kv_cache_tokens=kv_tokens, progress=False, weights=weights
    )
    stage("LLM(): load, tokenizer, KV pool")
    prompts = make_prompts(llm.tokenizer, concurrency + 1, prompt_len)[1:]
    stage("the benchmark's prompts")
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, 10_000 + i)
    engine.step()
    stage(f"prefill {concurrency} x {prompt_len} (one step)")
    while engine.has_unfinished():
        engine.step()
    stage(f"{gen_len - 1} decode steps")
    llm.generate(prompts, params)
    stage(f"second {concurrency}-way run")
    report = llm.memory_report()
    rows.append({"weights_bytes": report["weights_bytes"], "kv_pool_bytes": report["kv_pool_bytes"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="bf16,w4g64")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rss_stages.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--model", default=None, help="HF dir or synthetic alias (default: the embedded SmolLM2)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.concurrency, args.prompt_len, args.gen_len, args.model)))
        return
    results = {}
    for variant in args.variants.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", variant, "--concurrency", str(args.concurrency),
                               "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
                               *(["--model", args.model] if args.model else [])],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"{variant}: {done.stderr.strip()[-2000:]}")
        rows = json.loads(done.stdout.strip().splitlines()[-1])
        results[variant] = {"stages": rows[:-1], **rows[-1]}
        print(f"{variant}: weights {rows[-1]['weights_bytes'] / 2**20:.0f} MiB")
        print(f"  {'stage':34} {'RSS':>5} {'peak':>5} {'anon':>5} {'file':>5} {'heap':>5} {'free':>5}  MiB")
        for r in rows[:-1]:
            cells = [r[k] / 2**20 for k in ("rss", "peak", "anon", "file", "heap_arena", "heap_free")]
            print(
                f"  {r['stage']:34} "
                + " ".join(f"{c:5.0f}" for c in cells)
                + "  "
                + ",".join(r["heavy_modules"])
            )
    settings = {
        "concurrency": args.concurrency,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "threads": 2,
        "model": args.model or "embedded SmolLM2-135M",
    }
    Path(args.out).write_text(json.dumps({"settings": settings, "variants": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
