"""Quantized KV cache benchmark (issue 6) on SmolLM2-135M: capacity, quality, throughput under memory pressure.

    python benchmarks/kv_quant.py [--threads 2] [--ppl-windows 4] [--requests 32] [--prompt-len 64] [--output-len 64]

1. Capacity: tokens that one byte budget holds in bf16, int8 and int4, next to the planner's figure.
2. Quality: perplexity with each KV format on pydoc_data.topics, fp32 model. Each window of `--ppl-len` tokens
   is prefilled through the paged cache in pieces of `--chunk` tokens, so every piece attends over the
   K/V the cache *stored* for the earlier pieces (quantized ones for int8/int4), as decoding would.
   Also greedy generations of the engine-test prompts, compared token by token with the fp32 KV.
3. Throughput under memory pressure: `--requests` requests of `--prompt-len` + `--output-len` tokens (EOS
   ignored, so every run generates the same tokens) with a KV budget that holds ~4 such sequences in bf16;
   the model runs in `--dtype` (bfloat16 by default, what `auto` picks on this CPU).

The defaults take ~5-10 minutes on 2 cores. Writes benchmarks/results/kv_quant_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from slimlm.bench.workload import REFERENCE_PROMPTS, corpus_text, make_prompts
from slimlm.engine.llm import LLM
from slimlm.engine.memory import format_bytes
from slimlm.engine.params import SamplingParams
from slimlm.kv import kv_cache_class, make_kv_cache
from slimlm.kv.metadata import AttnMetadata
from slimlm.loading import load

KV_DTYPES = ("bf16", "int8", "int4")


def planner_tokens(config, kv_dtype: str, budget: int, block_size: int) -> int | None:
    try:
        from slimlm.plan.inference import kv_block_bytes
    except ImportError:
        return None
    return budget // kv_block_bytes(config, kv_dtype, block_size) * block_size


def capacity(loaded, budget: int, block_size: int) -> dict:
    rows = {}
    for kv_dtype in KV_DTYPES:
        llm = LLM.from_loaded(loaded, kv_cache_bytes=budget, block_size=block_size, kv_dtype=kv_dtype)
        report = llm.memory_report()
        rows[kv_dtype] = {
            "tokens": report["kv_tokens"],
            "pool_bytes": report["kv_pool_bytes"],
            "planner_tokens": planner_tokens(loaded.config, kv_dtype, budget, block_size),
            "startup_report": llm.memory_report_text(),
        }
        del llm
    for row in rows.values():
        row["ratio_vs_bf16"] = row["tokens"] / rows["bf16"]["tokens"]
    return rows


@torch.inference_mode()
def chunked_perplexity(
    loaded, ids: list[int], kv_dtype: str, window: int, chunk: int, block_size: int = 16
) -> float:
    """exp(mean NLL) over consecutive windows, each prefilled through a fresh paged cache `chunk` tokens at a time."""
    model, config = loaded.model, loaded.config
    dtype = next(model.parameters()).dtype
    num_blocks = -(-window // block_size)
    table = torch.arange(num_blocks)[None, :]  # one sequence owning blocks 0..n-1
    total_nll, count = 0.0, 0
    for w in range(len(ids) // window):
        tokens = torch.tensor(ids[w * window : (w + 1) * window])
        cache = make_kv_cache(config, num_blocks, block_size, kv_dtype, dtype, "cpu")
        for start in range(0, window, chunk):
            end = min(start + chunk, window)
            positions = torch.arange(start, end)
            meta = AttnMetadata([end - start], [end], block_tables=table, slot_mapping=positions)
            logits = model.compute_logits(model(tokens[start:end], positions, cache, meta))  # [n, vocab] fp32
            targets = tokens[start + 1 : end + 1]
            logprobs = torch.log_softmax(logits[: len(targets)], dim=-1)
            total_nll -= logprobs.gather(1, targets[:, None]).sum().item()
            count += len(targets)
    return math.exp(total_nll / count)


def quality(loaded, windows: int, window: int, chunk: int, max_tokens: int) -> dict:
    ids = loaded.tokenizer.encode(corpus_text()[:200_000], add_special_tokens=False)
    # Windows spread over the corpus rather than its first pages only.
    stride = len(ids) // windows
    ids = [t for w in range(windows) for t in ids[w * stride : w * stride + window]]
    ppl = {}
    for kv_dtype in ("fp32", *KV_DTYPES):
        start = time.perf_counter()
        ppl[kv_dtype] = chunked_perplexity(loaded, ids, kv_dtype, window, chunk)
        print(f"  ppl {kv_dtype}: {ppl[kv_dtype]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0)
    gens = {}
    for kv_dtype in ("fp32", *KV_DTYPES):
        llm = LLM.from_loaded(loaded, kv_cache_tokens=2048, kv_dtype=kv_dtype)
        gens[kv_dtype] = [(o.token_ids, o.text) for o in llm.generate(REFERENCE_PROMPTS, greedy)]
    ref = [ids for ids, _ in gens["fp32"]]

    def first_divergence(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    return {
        "tokens_scored": len(ids) - len(ids) // window,
        "window": window,
        "chunk": chunk,
        "ppl": ppl,
        "delta_ppl_pct_vs_fp32_kv": {k: 100 * (v / ppl["fp32"] - 1) for k, v in ppl.items()},
        "greedy": {
            k: {
                "identical": sum(a == b for a, (b, _) in zip(ref, g, strict=True)),
                "first_divergence": [first_divergence(a, b) for a, (b, _) in zip(ref, g, strict=True)],
                "texts": [t for _, t in g],
            }
            for k, g in gens.items()
        },
        "prompts": REFERENCE_PROMPTS,
    }


def throughput(
    loaded, requests: int, prompt_len: int, output_len: int, seqs_in_bf16: int, block_size: int
) -> dict:
    config = loaded.config
    blocks_per_seq = -(-(prompt_len + output_len) // block_size)
    budget = (
        seqs_in_bf16
        * blocks_per_seq
        * kv_cache_class("bf16").bytes_per_block(config, block_size, torch.bfloat16)
    )
    prompts = make_prompts(loaded.tokenizer, requests, prompt_len)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    rows = {}
    for kv_dtype in KV_DTYPES:
        llm = LLM.from_loaded(
            loaded,
            kv_cache_bytes=budget,
            block_size=block_size,
            kv_dtype=kv_dtype,
            max_num_seqs=requests,
            enable_prefix_caching=False,
        )
        llm.generate(prompts[0], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        before = llm.engine.stats.steps, llm.engine.stats.preemptions, llm.engine.stats.generated_tokens
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - start
        generated = sum(len(o.token_ids) for o in outs)
        steps = llm.engine.stats.steps - before[0]
        rows[kv_dtype] = {
            "kv_tokens": llm.memory_report()["kv_tokens"],
            "wall_s": wall,
            "generated_tokens": generated,
            "tokens_per_s": generated / wall,
            "steps": steps,
            "preemptions": llm.engine.stats.preemptions - before[1],
        }
        print(f"  {kv_dtype}: {rows[kv_dtype]}", flush=True)
        del llm
    for row in rows.values():
        row["speedup_vs_bf16"] = row["tokens_per_s"] / rows["bf16"]["tokens_per_s"]
    return {
        "budget_bytes": budget,
        "requests": requests,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "budget_holds_bf16_seqs": seqs_in_bf16,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "runs": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=64 * 2**20, help="capacity section: KV bytes")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--ppl-len", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seqs-in-bf16", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", help="model dtype of the throughput run")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: capacity,quality,throughput")
    ap.add_argument("--out", default=None, help="results file (default results/kv_quant_<device>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"threads": args.threads, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"}
    fp32 = load(None, dtype="float32", progress=False)
    start = time.perf_counter()
    if "capacity" not in skip:
        result["capacity"] = capacity(fp32, args.budget, block_size=16)
        print(f"capacity at {format_bytes(args.budget)}:")
        for name, row in result["capacity"].items():
            print(
                f"  {name}: {row['tokens']} tokens ({row['ratio_vs_bf16']:.3f}x bf16), planner {row['planner_tokens']}"
            )
            print(f"    {row['startup_report']}")
    if "quality" not in skip:
        print("quality (fp32 model):", flush=True)
        result["quality"] = quality(fp32, args.ppl_windows, args.ppl_len, args.chunk, args.gen_tokens)
        for name, d in result["quality"]["delta_ppl_pct_vs_fp32_kv"].items():
            greedy = result["quality"]["greedy"][name]
            print(
                f"  {name}: ppl {result['quality']['ppl'][name]:.4f} ({d:+.3f}%), greedy identical "
                f"{greedy['identical']}/{len(REFERENCE_PROMPTS)}, first divergence {greedy['first_divergence']}"
            )
    del fp32
    if "throughput" not in skip:
        model = load(None, dtype=args.dtype, progress=False)
        print(f"throughput under memory pressure ({args.dtype} model):", flush=True)
        result["throughput"] = throughput(
            model, args.requests, args.prompt_len, args.output_len, args.seqs_in_bf16, block_size=16
        )
        for name, row in result["throughput"]["runs"].items():
            print(
                f"  {name}: {row['tokens_per_s']:.1f} tok/s ({row['speedup_vs_bf16']:.2f}x bf16), "
                f"{row['kv_tokens']} KV tokens, {row['steps']} steps, {row['preemptions']} preemptions"
            )
    result["total_s"] = time.perf_counter() - start
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"kv_quant_{device}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
