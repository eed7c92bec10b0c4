"""Side-by-side variants: perplexity, its change, weight bytes, batch-1 decode speed and load time."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass

import torch

from slimlm.eval.perplexity import perplexity


@dataclass
class VariantResult:
    label: str
    ppl: float
    weight_bytes: int
    decode_tok_s: float
    load_s: float
    delta_pct: float = 0.0


def weight_bytes(model) -> int:
    from slimlm.quant.quantize import quantized_weight_bytes

    return quantized_weight_bytes(model)


def decode_rate(loaded, prompt_len: int = 64, gen_len: int = 64, runs: int = 3) -> float:
    """Median batch-1 greedy decode tokens/s after the first token, through the engine."""
    import statistics

    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams

    llm = LLM.from_loaded(
        loaded,
        weights_layout="auto",  # as the commands run it: the C kernel where it runs (quantized too)
        kv_cache_tokens=prompt_len + gen_len + 32,
        enable_prefix_caching=False,
    )
    prompt = list(range(1000, 1000 + prompt_len))
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    rates = []
    for _ in range(runs + 1):  # the first run warms up
        start = time.perf_counter()
        stamps = [time.perf_counter() - start for _ in llm.stream(prompt, params)]
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(rates[1:])


def compare_variants(
    models: list[str | None],
    labels: list[str],
    dtype: str,
    token_ids_fn,
    context: int,
    max_tokens: int | None,
    progress: bool = True,
) -> list[VariantResult]:
    from slimlm.loading import load

    results = []
    for model, label in zip(models, labels, strict=True):
        loaded = load(model, dtype=dtype, progress=progress)
        ids = token_ids_fn(loaded.tokenizer)
        ppl = perplexity(loaded.model, ids, context=context, max_tokens=max_tokens, progress=progress).ppl
        results.append(
            VariantResult(label, ppl, weight_bytes(loaded.model), decode_rate(loaded), loaded.load_seconds)
        )
        del loaded
        gc.collect()
    base = results[0].ppl
    for r in results:
        r.delta_pct = 100 * (r.ppl - base) / base
    return results


def print_results(results: list[VariantResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"variants vs {results[0].label} (threads={torch.get_num_threads()})")
    for col in ("variant", "perplexity", "Δ ppl", "weights", "decode tok/s", "load s"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.label,
            f"{r.ppl:.3f}",
            f"{r.delta_pct:+.2f}%",
            f"{r.weight_bytes / 2**20:.1f} MiB",
            f"{r.decode_tok_s:.1f}",
            f"{r.load_s:.1f}",
        )
    Console().print(table)


def as_dicts(results: list[VariantResult]) -> list[dict]:
    return [asdict(r) for r in results]
