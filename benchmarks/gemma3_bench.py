"""Gemma 3 270M (the Q4_K_M GGUF of `--model gemma3-270m`): slimlm with the file's own blocks
(`--weights native`) and dequantized to bf16, transformers and llama-cpp-python, on the same token ids.

    python benchmarks/gemma3_bench.py --part slimlm        # slimlm native, slimlm bf16, llama.cpp
    python benchmarks/gemma3_bench.py --part transformers  # transformers, llama.cpp again
    python benchmarks/gemma3_bench.py --merge              # one table from the two parts

Two parts because transformers needs minutes to load this GGUF (its 262k-token vocabulary) here: each
part loads its systems first, then measures them one after another (slimlm.bench.run's measurement:
TTFT and batch-1 decode for a 128-token prompt, 16 requests of 128 + 128 tokens, medians of --runs),
and llama.cpp runs in both parts as the anchor for ratios across them. Nothing is cached between
parts or runs (each part is a fresh process that loads from the GGUF).

`--locks DIR` (the shared build machine): load under DIR/cpu.lock shared, then measure alone, holding
DIR/gate.lock and DIR/cpu.lock exclusively (what /work/wt/bin/cpu and /work/wt/bin/quiet do), so the
exclusive hold covers the measurements and not the loading.

Writes benchmarks/results/gemma3_bench_<part>.json; --merge writes gemma3_bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import time
from pathlib import Path

import torch

from slimlm.bench.peers import LlamaCppRunner, SlimlmRunner, TransformersRunner
from slimlm.bench.run import _measure
from slimlm.bench.workload import make_prompts

RESULTS = Path(__file__).parent / "results"
CONCURRENCY, PROMPT_LEN, GEN_LEN = 16, 128, 128


@contextlib.contextmanager
def _flock(path: Path, mode: int):
    with open(path, "a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def shared(lock_dir: Path | None):
    if lock_dir is None:
        yield
        return
    with _flock(lock_dir / "gate.lock", fcntl.LOCK_EX):  # wait while a quiet run waits or runs
        pass
    with _flock(lock_dir / "cpu.lock", fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def alone(lock_dir: Path | None):
    if lock_dir is None:
        yield
        return
    with _flock(lock_dir / "gate.lock", fcntl.LOCK_EX), _flock(lock_dir / "cpu.lock", fcntl.LOCK_EX):
        print(f"measuring alone from {time.strftime('%H:%M:%S')}", flush=True)
        yield


def _slimlm(weights: str, dtype: str):
    from slimlm.engine.llm import LLM

    kv_tokens = (CONCURRENCY + 1) * (PROMPT_LEN + GEN_LEN + 16)
    llm = LLM("gemma3-270m", dtype=dtype, device="cpu", kv_cache_tokens=kv_tokens, progress=False,
              weights=weights)  # fmt: skip
    report = llm.memory_report()
    info = {
        "weights": report["weights_format"],
        "weights_bytes": report["weights_bytes"],
        "weights_layout": report["weights_layout"],
        "decode_steps_on": report["decode_kernel"],
    }
    return llm, info


def _tokenizer():
    from slimlm.loading.gemma3_model import gemma3_model_path
    from slimlm.loading.gguf_file import GGUFFile, config_and_tokenizer

    with GGUFFile(gemma3_model_path()) as file:
        return config_and_tokenizer(file)[1]


def run_part(part: str, runs: int, threads: int, lock_dir: Path | None) -> dict:
    from slimlm.loading.gemma3_model import gemma3_model_path

    torch.set_num_threads(threads)
    path = gemma3_model_path()
    systems, info, load_s = {}, {}, {}
    with shared(lock_dir):
        if part == "slimlm":
            for name, weights, dtype in (
                ("slimlm native", "native", "bfloat16"),
                ("slimlm bf16", "float", "bfloat16"),
            ):
                start = time.perf_counter()
                llm, info[name] = _slimlm(weights, dtype)
                load_s[name] = time.perf_counter() - start
                systems[name] = SlimlmRunner(llm)
            tokenizer = llm.tokenizer
        else:
            start = time.perf_counter()
            systems["transformers"] = TransformersRunner(path, torch.bfloat16)
            load_s["transformers"] = time.perf_counter() - start
            info["transformers"] = {"weights": "dense bf16 (GGUF dequantized at load)"}
            tokenizer = _tokenizer()
        start = time.perf_counter()
        systems["llama.cpp"] = LlamaCppRunner(path, threads, n_ctx=PROMPT_LEN + GEN_LEN + 64)
        load_s["llama.cpp"] = time.perf_counter() - start
        info["llama.cpp"] = {"weights": "the GGUF's own blocks (Q4_K_M: Q8_0 embedding, Q5_0/Q4_K/Q6_K/Q8_0)"}
    prompts = make_prompts(tokenizer, CONCURRENCY + 1, PROMPT_LEN)
    single, batch = prompts[0], prompts[1:]
    results = {}
    with alone(lock_dir):
        started = time.time()
        for name, runner in systems.items():
            print(f"{name}:", flush=True)
            results[name] = {**_measure(runner, batch, single, GEN_LEN, runs, print), **info[name],
                             "load_s": load_s[name]}  # fmt: skip
        held = time.time() - started
    del systems
    gc.collect()
    return {
        "part": part,
        "model": str(path),
        "model_file_bytes": path.stat().st_size,
        "threads": threads,
        "runs": runs,
        "concurrency": CONCURRENCY,
        "prompt_len": PROMPT_LEN,
        "gen_len": GEN_LEN,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "measuring_s": held,
        "systems": results,
    }


def merge() -> dict:
    parts = [json.loads((RESULTS / f"gemma3_bench_{p}.json").read_text()) for p in ("slimlm", "transformers")]
    rows = {}
    for part in parts:
        anchor = part["systems"]["llama.cpp"]
        for name, r in part["systems"].items():
            key = name if name != "llama.cpp" else f"llama.cpp ({part['part']} part)"
            rows[key] = {
                "ttft_ms": r["ttft_s"] * 1000,
                "decode_tok_s": r["decode_tok_s"],
                "throughput_tok_s": r["throughput_tok_s"],
                "decode_vs_llama_cpp": r["decode_tok_s"] / anchor["decode_tok_s"],
                "throughput_vs_llama_cpp": r["throughput_tok_s"] / anchor["throughput_tok_s"],
                "ttft_vs_llama_cpp": anchor["ttft_s"] / r["ttft_s"],
                "part": part["part"],
            }
    by_part = {p["part"]: p for p in parts}
    slim, tf = by_part["slimlm"]["systems"], by_part["transformers"]["systems"]
    # slimlm vs transformers across the two parts, through the llama.cpp anchor of each
    ratios = {}
    for name in ("slimlm native", "slimlm bf16"):
        ratios[name] = {
            metric: (slim[name][metric] / slim["llama.cpp"][metric])
            / (tf["transformers"][metric] / tf["llama.cpp"][metric])
            for metric in ("decode_tok_s", "throughput_tok_s")
        }
        ratios[name]["ttft_faster"] = (tf["transformers"]["ttft_s"] / tf["llama.cpp"]["ttft_s"]) / (
            slim[name]["ttft_s"] / slim["llama.cpp"]["ttft_s"]
        )
    return {"parts": parts, "rows": rows, "slimlm_vs_transformers_via_anchor": ratios}


def print_merged(merged: dict) -> None:
    print(
        "| system | part | TTFT ms | batch-1 decode tok/s | 16-way tok/s | decode vs llama.cpp | 16-way vs llama.cpp |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, r in merged["rows"].items():
        print(f"| {name} | {r['part']} | {r['ttft_ms']:.0f} | {r['decode_tok_s']:.1f} | {r['throughput_tok_s']:.1f} | "
              f"{r['decode_vs_llama_cpp']:.2f} | {r['throughput_vs_llama_cpp']:.2f} |")  # fmt: skip
    for name, r in merged["slimlm_vs_transformers_via_anchor"].items():
        print(f"{name} vs transformers (through the llama.cpp anchor): decode {r['decode_tok_s']:.2f}x, "
              f"16-way {r['throughput_tok_s']:.2f}x, TTFT {r['ttft_faster']:.2f}x faster")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("slimlm", "transformers"))
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--locks", type=Path, default=None, help="directory of cpu.lock / gate.lock (see above)")
    args = ap.parse_args()
    if args.merge:
        merged = merge()
        (RESULTS / "gemma3_bench.json").write_text(json.dumps(merged, indent=2))
        print_merged(merged)
    elif args.part:
        result = run_part(args.part, args.runs, args.threads, args.locks)
        out = RESULTS / f"gemma3_bench_{args.part}.json"
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out} (measured alone for {result['measuring_s']:.0f} s)")
    else:
        ap.error("give --part slimlm|transformers or --merge")
