"""Run the engine benchmark for slimlm and its peers in one process, one after another, same threads."""

from __future__ import annotations

import gc
import statistics
from typing import Any

import torch

from slimlm.bench.peers import LlamaCppRunner, SlimlmRunner, TransformersRunner
from slimlm.bench.workload import make_prompts
from slimlm.errors import SlimlmError

PEERS = ("slimlm", "transformers", "llama.cpp")


def _measure(runner, prompts, prompt_single, gen_len: int, runs: int, log) -> dict[str, Any]:
    """Median TTFT and batch-1 rate (`runner.first_and_rate`) and all-prompts throughput (`runner.throughput`)."""
    firsts, rates, throughputs = [], [], []
    runner.first_and_rate(prompt_single[:16], 4)  # warm-up: allocator, kernels, caches
    for i in range(runs):
        first, rate = runner.first_and_rate(prompt_single, gen_len)
        firsts.append(first)
        rates.append(rate)
        throughputs.append(runner.throughput(prompts, gen_len))
        log(
            f"  {runner.name} run {i + 1}/{runs}: ttft {first * 1000:.0f} ms, decode {rate:.1f} tok/s, "
            f"{len(prompts)}-way {throughputs[-1]:.1f} tok/s"
        )
    return {
        "ttft_s": statistics.median(firsts),
        "decode_tok_s": statistics.median(rates),
        "throughput_tok_s": statistics.median(throughputs),
        "runs": {"ttft_s": firsts, "decode_tok_s": rates, "throughput_tok_s": throughputs},
    }


def run_bench(
    model: str | None = None,
    dtype: str = "auto",
    peers: tuple[str, ...] = PEERS,
    runs: int = 3,
    concurrency: int = 16,
    prompt_len: int = 128,
    gen_len: int = 128,
    threads: int | None = None,
    log=print,
    weights_layout: str = "auto",
    decode_kernel: str = "auto",
    weights: str = "float",
) -> dict[str, Any]:
    """`weights_layout` "auto" measures each workload on the layout slimlm's commands pick for it:
    batch-1 (TTFT, decode) as `slimlm chat` / `generate "one prompt"` run it, the concurrent throughput
    as `slimlm serve` runs it (plain for both where the C decode kernel runs; else plain / packed).
    Any other value runs everything on that layout. `decode_kernel` as EngineConfig.decode_kernel."""
    from slimlm.engine.config import EngineConfig
    from slimlm.engine.llm import LLM, auto_weights_layout, resolve_dtype
    from slimlm.models.prepack import check_weights_layout

    unknown = set(peers) - set(PEERS)
    if unknown:
        raise SlimlmError(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    check_weights_layout(weights_layout)
    dtype = resolve_dtype(dtype, torch.device("cpu"))
    EngineConfig(decode_kernel=decode_kernel)  # a bad value fails before anything loads

    def build(layout: str):
        kv_tokens = (concurrency + 1) * (prompt_len + gen_len + 16)
        return LLM(
            model, dtype=dtype, device="cpu", kv_cache_tokens=kv_tokens, progress=False, weights_layout=layout,
            decode_kernel=decode_kernel, weights=weights,
        )  # fmt: skip

    batch_llm = build(weights_layout)
    batch_layout = batch_llm.weights_layout
    single_layout = batch_layout
    if weights_layout == "auto":  # as chat picks: plain for one bf16/fp16 stream
        single_layout = auto_weights_layout(1, getattr(torch, dtype), batch_layout == "plain")
    llm = build(single_layout) if single_layout != batch_layout else batch_llm
    prompts = make_prompts(llm.tokenizer, concurrency + 1, prompt_len)
    single, batch = prompts[0], prompts[1:]
    results: dict[str, Any] = {
        "model": str(llm.loaded.source),
        "dtype": dtype,
        "threads": threads,
        "runs": runs,
        "concurrency": concurrency,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "systems": {},
        "weights_layout": {"batch-1": single_layout, "concurrent": batch_layout},
        "decode_kernel": {
            "batch-1": llm.engine.decode_backend,
            "concurrent": batch_llm.engine.decode_backend,
        },
        "weights": {
            "slimlm": f"dense {dtype} (GGUF dequantized at load); linears {single_layout} for batch-1, "
            f"{batch_layout} for concurrent requests (slimlm.models.prepack)",
            "transformers": f"dense {dtype} (GGUF dequantized at load)",
            "llama.cpp": "the GGUF's own quantized blocks (e.g. Q4_1), no dequantization",
        },
    }
    log(
        f"benchmark: {llm.loaded.source.name}, {dtype}, {threads} threads, median of {runs} runs; slimlm "
        f"weights layout {single_layout} (batch-1) / {batch_layout} (concurrent); decode steps on "
        f"{batch_llm.engine.decode_backend}"
    )
    if "slimlm" in peers:
        runner = SlimlmRunner(llm, batch_llm)
        results["systems"]["slimlm"] = _measure(runner, batch, single, gen_len, runs, log)
        del runner
    del llm, batch_llm
    gc.collect()
    if "transformers" in peers:
        try:
            runner = TransformersRunner(results_source(results), getattr(torch, dtype))
            results["systems"]["transformers"] = _measure(runner, batch, single, gen_len, runs, log)
            del runner
            gc.collect()
        except ImportError:
            results["systems"]["transformers"] = {"unavailable": "pip install transformers accelerate"}
    if "llama.cpp" in peers:
        if not str(results["model"]).endswith(".gguf"):
            results["systems"]["llama.cpp"] = {"unavailable": "needs a GGUF model"}
        else:
            try:
                runner = LlamaCppRunner(results["model"], threads, n_ctx=prompt_len + gen_len + 64)
                results["systems"]["llama.cpp"] = _measure(runner, batch, single, gen_len, runs, log)
            except ImportError:
                results["systems"]["llama.cpp"] = {
                    "unavailable": "pip install llama-cpp-python (slimlm[bench])"
                }
    return results


def results_source(results: dict[str, Any]):
    from pathlib import Path

    return Path(results["model"])


def ratio_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(system, metric values..., ratio vs slimlm) rows for printing."""
    base = results["systems"].get("slimlm", {})
    rows = []
    for name, r in results["systems"].items():
        if "unavailable" in r:
            rows.append((name, "-", "-", "-", f"unavailable: {r['unavailable']}"))
            continue
        ratios = ""
        if name != "slimlm" and "decode_tok_s" in base:
            ratios = (
                f"slimlm decode {base['decode_tok_s'] / r['decode_tok_s']:.2f}x, "
                f"throughput {base['throughput_tok_s'] / r['throughput_tok_s']:.2f}x, "
                f"ttft {r['ttft_s'] / base['ttft_s']:.2f}x faster"
            )
        rows.append(
            (
                name,
                f"{r['ttft_s'] * 1000:.0f}",
                f"{r['decode_tok_s']:.1f}",
                f"{r['throughput_tok_s']:.1f}",
                ratios,
            )
        )
    return rows


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{results['concurrency']} x {results['prompt_len']}/{results['gen_len']} tokens, "
        f"{results['dtype']}, {results['threads']} threads, median of {results['runs']}"
    )
    for col in (
        "system",
        "TTFT ms",
        "batch-1 decode tok/s",
        f"{results['concurrency']}-way tok/s",
        "slimlm vs peer",
    ):
        table.add_column(col)
    for row in ratio_rows(results):
        table.add_row(*row)
    Console().print(table)
