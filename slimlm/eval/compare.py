"""Side-by-side variants over the same windows: perplexity and its change, KL divergence from the first
variant's next-token distributions (mean, p99) and top-1 agreement, weight bytes, KV bytes per token,
batch-1 decode speed and load time."""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from slimlm.eval.fidelity import FidelityStats, log_probs
from slimlm.eval.perplexity import scored_count, scored_windows
from slimlm.eval.reference import ReferenceReader, ReferenceWriter, ids_hash, model_shape


@dataclass
class VariantResult:
    label: str
    ppl: float
    weight_bytes: int
    decode_tok_s: float
    load_s: float
    delta_pct: float = 0.0
    kl_mean: float = 0.0
    kl_p99: float = 0.0
    top1_agree: float = 1.0
    kv_dtype: str = "auto"
    kv_bytes_per_token: int = 0


def weight_bytes(model) -> int:
    from slimlm.quant.quantize import quantized_weight_bytes

    return quantized_weight_bytes(model)


def decode_rate(
    loaded, prompt_len: int = 64, gen_len: int = 64, runs: int = 3, kv_dtype: str = "auto"
) -> float:
    """Median batch-1 greedy decode tokens/s after the first token, through the engine as it runs
    (C decode kernel where it can, `auto` weight layout)."""
    import statistics

    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams

    llm = LLM.from_loaded(
        loaded,
        weights_layout="auto",  # as the commands run it: the C kernel where it runs (quantized too)
        kv_cache_tokens=prompt_len + gen_len + 32,
        enable_prefix_caching=False,
        kv_dtype=kv_dtype,
        max_num_seqs=1,
    )
    prompt = list(range(1000, 1000 + prompt_len))
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    rates = []
    for _ in range(runs + 1):  # the first run warms up
        start = time.perf_counter()
        stamps = [time.perf_counter() - start for _ in llm.stream(prompt, params)]
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(rates[1:])


def run_meta(loaded, ids: list[int], context: int, stride: int | None, max_tokens: int | None) -> dict:
    used = ids[: max_tokens + 1] if max_tokens else ids
    return {
        "model": model_shape(loaded.config),
        "ids_hash": ids_hash(used),
        "num_ids": len(used),
        "context": context,
        "stride": stride or context,
    }


def kv_bytes_per_token(config, kv_dtype: str, dtype: torch.dtype) -> int:
    from slimlm.kv import kv_cache_class, kv_storage_dtype

    block = 16
    return kv_cache_class(kv_dtype).bytes_per_block(config, block, kv_storage_dtype(kv_dtype, dtype)) // block


def _stage(i: int, n: int, label: str, what: str, enabled: bool) -> None:
    if enabled:
        print(f"[{i}/{n}] {label}: {what}", file=sys.stderr, flush=True)


def compare_variants(
    models: list[str | None],
    labels: list[str],
    dtype: str,
    token_ids_fn,
    context: int,
    max_tokens: int | None,
    progress: bool = True,
    stride: int | None = None,
    kv_dtypes: list[str] | None = None,
    ref_logits: str | None = None,
    speed: bool = True,
) -> list[VariantResult]:
    """The first variant is the reference: its log-probs are kept (in `ref_logits`, or a temporary
    directory) and every later variant is scored against them on the same windows."""
    from slimlm.loading import load

    kv_dtypes = kv_dtypes or ["auto"] * len(models)
    results = []
    tmp = None
    if ref_logits is None:
        tmp = tempfile.TemporaryDirectory(prefix="slimlm-ref-")
        ref_logits = tmp.name
    n = len(models)
    try:
        for i, (model, label, kv) in enumerate(zip(models, labels, kv_dtypes, strict=True), start=1):
            _stage(i, n, label, "loading", progress)
            loaded = load(model, dtype=dtype, progress=progress)
            ids = token_ids_fn(loaded.tokenizer)
            meta = run_meta(loaded, ids, context, stride, max_tokens)
            _stage(i, n, label, f"perplexity{'' if i == 1 else ' and KL'} (KV {kv})", progress)
            stats, writer, reader = FidelityStats(), None, None
            windows = scored_windows(
                loaded.model, ids, context, stride, max_tokens, progress, kv, label=f"{label} perplexity"
            )
            if i == 1:
                rows = scored_count(meta["num_ids"], context, stride)
                writer = ReferenceWriter(ref_logits, rows, loaded.config.vocab_size, meta)
                for logits, targets in windows:
                    ref = writer.add(log_probs(logits))
                    stats.add_logprobs(ref, logits, targets)
                writer.close()
            else:
                reader = ReferenceReader(ref_logits)
                reader.check(meta)
                for logits, targets in windows:
                    stats.add_logprobs(reader.next(len(targets)), logits, targets)
            s = stats.summary()
            rate = 0.0
            if speed:
                _stage(i, n, label, "decode speed", progress)
                rate = decode_rate(loaded, kv_dtype=kv)
            results.append(
                VariantResult(
                    label,
                    s["ppl"],
                    weight_bytes(loaded.model),
                    rate,
                    loaded.load_seconds,
                    kl_mean=s["kl_mean"],
                    kl_p99=s["kl_p99"],
                    top1_agree=s["top1_agree"],
                    kv_dtype=kv,
                    kv_bytes_per_token=kv_bytes_per_token(
                        loaded.config, kv, next(loaded.model.parameters()).dtype
                    ),
                )
            )
            del loaded
            gc.collect()
    finally:
        if tmp is not None:
            tmp.cleanup()
    base = results[0].ppl
    for r in results:
        r.delta_pct = 100 * (r.ppl - base) / base
    return results


def print_results(results: list[VariantResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"variants vs {results[0].label} (threads={torch.get_num_threads()})")
    cols = ("variant", "KV", "perplexity", "Δ ppl", "KL mean", "KL p99", "top-1 =", "weights", "KV B/token")
    for col in (*cols, "decode tok/s", "load s"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.label,
            r.kv_dtype,
            f"{r.ppl:.3f}",
            f"{r.delta_pct:+.2f}%",
            f"{r.kl_mean:.4f}",
            f"{r.kl_p99:.4f}",
            f"{100 * r.top1_agree:.1f}%",
            f"{r.weight_bytes / 2**20:.1f} MiB",
            str(r.kv_bytes_per_token),
            f"{r.decode_tok_s:.1f}",
            f"{r.load_s:.1f}",
        )
    Console().print(table)


def as_dicts(results: list[VariantResult]) -> list[dict]:
    return [asdict(r) for r in results]
