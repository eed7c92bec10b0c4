"""`--plot FILE.png`: memory against context length and against batch, stacked by component."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.plan.serving import InferencePlan, runtime_overheads
from slimlm.plan.training import TrainingPlan, plan_training
from slimlm.plan.units import GiB


def _powers_of_two(low: int, high: int) -> list[int]:
    out, x = [], low
    while x < high:
        out.append(x)
        x *= 2
    return [*out, high]


def inference_series(plan: InferencePlan, xs: list[int], axis: str) -> dict[str, list[int]]:
    """Memory a workload needs (the KV its sequences fill, not the pool) at each context or batch."""
    s, e = plan.settings, plan.settings.engine
    series: dict[str, list[int]] = {"weights": [], "kv_cache (needed)": [], "runtime": []}
    weights = next(c.bytes for c in plan.components if c.name == "weights")
    fixed = sum(c.bytes for c in plan.components if c.name == "cuda_context")
    for x in xs:
        context, batch = (x, s.batch) if axis == "context" else (plan.context, x)
        blocks = batch * -(-context // e.block_size)
        settings = dataclasses.replace(s, context=context, batch=batch)
        runtime = (
            runtime_overheads(plan.model, settings, context, max(plan.max_model_len, context)).peak
            if s.runtime_overheads
            else 0
        )
        series["weights"].append(weights)
        series["kv_cache (needed)"].append(blocks * plan.kv_block_bytes)
        series["runtime"].append(fixed + runtime)
    return series


def training_series(plan: TrainingPlan, xs: list[int], axis: str) -> dict[str, list[int]]:
    names = [
        "weights",
        "master_weights",
        "optimizer_states",
        "gradients",
        "activations",
        "logits",
        "workspace",
        "cuda_context",
    ]
    series: dict[str, list[int]] = {n: [] for n in names}
    for x in xs:
        change = {"seq_len": x} if axis == "context" else {"micro_batch": x}
        p = plan_training(plan.model, plan.device, dataclasses.replace(plan.settings, **change))
        got = {c.name: c.bytes for c in p.components if not c.host}
        for n in names:
            series[n].append(got.get(n, 0))
    return {k: v for k, v in series.items() if any(v)}


def plot_plan(plan: InferencePlan | TrainingPlan, path: str | Path, title: str = "") -> Path:
    """Write a PNG with two stacked-area panels: bytes vs context length and vs batch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SlimlmError("--plot needs matplotlib; install it with pip install 'slimlm[plot]'") from None
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SlimlmError(f"--plot writes a PNG; give a file name ending in .png, got {str(path)!r}")
    if isinstance(plan, InferencePlan):
        max_len = plan.max_model_len
        contexts = _powers_of_two(min(256, max_len), max_len)
        batches = _powers_of_two(1, max(plan.settings.engine.max_num_seqs, plan.settings.batch))
        panels = [
            (
                "context length (tokens)",
                f"batch {plan.settings.batch}",
                contexts,
                inference_series(plan, contexts, "context"),
            ),
            (
                "concurrent sequences",
                f"context {plan.context}",
                batches,
                inference_series(plan, batches, "batch"),
            ),
        ]
    else:
        s = plan.settings
        seqs = _powers_of_two(128, max(4 * s.seq_len, 1024))
        batches = _powers_of_two(1, max(2 * s.micro_batch, 8))
        panels = [
            (
                "sequence length (tokens)",
                f"micro-batch {s.micro_batch}",
                seqs,
                training_series(plan, seqs, "context"),
            ),
            ("micro-batch", f"sequence length {s.seq_len}", batches, training_series(plan, batches, "batch")),
        ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (xlabel, fixed, xs, series) in zip(axes, panels, strict=True):
        ax.stackplot(xs, *[[b / GiB for b in v] for v in series.values()], labels=list(series), alpha=0.85)
        ax.axhline(plan.device.usable_bytes / GiB, color="black", linestyle="--", label="device memory")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("GiB (2^30 bytes)")
        ax.set_title(f"vs {xlabel.split(' (')[0]} at {fixed}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize="small")
    fig.suptitle(title or f"{plan.device.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
