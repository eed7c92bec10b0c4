"""Plans as a stable JSON document (schema `slimlm.plan/1`, see docs/plan.md) and as a rich table."""

from __future__ import annotations

import dataclasses
from typing import Any

from slimlm.plan.components import Component
from slimlm.plan.models import PlannedModel
from slimlm.plan.serving import InferencePlan
from slimlm.plan.training import TrainingPlan
from slimlm.plan.units import GB, GiB, fmt_bytes

SCHEMA = "slimlm.plan/1"


def _model_json(pm: PlannedModel, plan: InferencePlan | TrainingPlan) -> dict[str, Any]:
    c = plan.model
    return {
        "name": pm.name,
        "source": pm.source,
        "architecture": pm.architecture,
        "runs_in_slimlm": pm.runs_in_slimlm,
        "parameters": c.num_parameters(),
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "file_bytes": pm.file_bytes,
        "note": pm.note,
    }


def _component_json(c: Component) -> dict[str, Any]:
    return {
        "name": c.name,
        "bytes": c.bytes,
        "exact": c.exact,
        "where": "host" if c.host else "device",
        "note": c.note,
    }


def _settings_json(settings: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            value = _settings_json(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def plan_to_json(
    pm: PlannedModel, plan: InferencePlan | TrainingPlan, suggestions: list[dict]
) -> dict[str, Any]:
    """The documented, stable JSON form of a plan (all sizes in bytes)."""
    d = plan.device
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "inference" if isinstance(plan, InferencePlan) else "training",
        "model": _model_json(pm, plan),
        "device": {
            "name": d.name,
            "kind": d.kind,
            "total_bytes": d.total_bytes,
            "usable_bytes": d.usable_bytes,
            "cuda_context_bytes": d.cuda_context_bytes,
            "source": d.source,
        },  # fmt: skip
        "settings": _settings_json(plan.settings),
        "components": [_component_json(c) for c in plan.components],
        "total_bytes": plan.total_bytes,
        "headroom_bytes": d.usable_bytes - plan.total_bytes,
        "fits": plan.fits,
    }
    if isinstance(plan, InferencePlan):
        doc["host_bytes"] = 0
        doc["problems"] = list(plan.problems)
        doc["inference"] = {
            "kv_bytes_per_token": plan.kv_bytes_per_token,
            "kv_block_bytes": plan.kv_block_bytes,
            "kv_blocks": plan.kv_blocks,
            "kv_tokens": plan.kv_tokens,
            "kv_budget": plan.kv_budget_source,
            "context": plan.context,
            "batch": plan.settings.batch,
            "max_model_len": plan.max_model_len,
            "max_concurrent_sequences": plan.max_concurrent_sequences,
            "max_context": plan.max_context,
            "runtime": None
            if plan.runtime is None
            else {
                "prefill_workspace_bytes": plan.runtime.prefill_workspace,
                "decode_workspace_bytes": plan.runtime.decode_workspace,
                "logits_bytes": plan.runtime.logits,
            },
        }
    else:
        doc["host_bytes"] = plan.host_bytes
        doc["problems"] = [] if plan.fits else ["the peak of a training step exceeds the device"]
        doc["training"] = {
            "num_devices": plan.settings.num_devices,
            "trainable_parameters": plan.trainable_parameters,
            "peak_phase": plan.peak_phase,
            "phases": dict(plan.phases),
            "model_states_per_device": dict(plan.model_states),
            "activation_bytes": plan.activation_bytes,
            "logits_bytes": plan.logits_bytes,
        }
    doc["suggestions"] = suggestions
    return doc


def render_table(doc: dict[str, Any], unit: str = "GiB", console=None) -> None:
    """Print a plan document with rich: the breakdown, the capacity lines, the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    scale = {"GiB": GiB, "GB": GB}[unit]
    m, d = doc["model"], doc["device"]
    title = f"{doc['mode']} plan: {m['name']} ({m['parameters'] / 1e9:.2f} B params) on {d['name']}"
    table = Table(title=title, title_justify="left")
    table.add_column("component")
    table.add_column(f"{unit}", justify="right")
    table.add_column("where")
    table.add_column("kind")
    table.add_column("note", overflow="fold")
    for c in doc["components"]:
        table.add_row(
            c["name"],
            f"{c['bytes'] / scale:,.3f}",
            c["where"],
            "exact" if c["exact"] else "estimate",
            c["note"],
        )
    table.add_section()
    table.add_row(
        "total (device)",
        f"{doc['total_bytes'] / scale:,.3f}",
        "",
        "",
        f"{d['kind']} usable {fmt_bytes(d['usable_bytes'], unit)}",
    )
    if doc.get("host_bytes"):
        table.add_row("total (host RAM)", f"{doc['host_bytes'] / scale:,.3f}", "", "", "optimizer offload")
    console.print(table)
    if m["note"]:
        console.print(f"model: {m['note']}")
    unit_note = "GiB = 2^30 bytes" if unit == "GiB" else "GB = 10^9 bytes"
    if doc["mode"] == "inference":
        inf = doc["inference"]
        console.print(
            f"KV cache: {inf['kv_bytes_per_token']:,} bytes/token, {inf['kv_tokens']:,} tokens ({inf['kv_budget']}); "
            f"at context {inf['context']:,}: {inf['max_concurrent_sequences']} sequences at once; "
            f"at batch {inf['batch']}: context up to {inf['max_context']:,} (max_model_len {inf['max_model_len']:,})"
        )
    else:
        tr = doc["training"]
        console.print(
            f"trainable parameters: {tr['trainable_parameters']:,}; peak at {tr['peak_phase']} "
            f"(per device, {tr['num_devices']} device(s))"
        )
    verdict = "[green]fits[/green]" if doc["fits"] else "[red]does not fit[/red]"
    console.print(f"verdict: {verdict}, headroom {fmt_bytes(doc['headroom_bytes'], unit)} ({unit_note})")
    for p in doc["problems"]:
        console.print(f"  - {p}")
    if doc["suggestions"]:
        console.print("nearest configurations that fit:")
        for s in doc["suggestions"]:
            console.print(f"  {s['change']}: {fmt_bytes(s['total_bytes'], unit)}" + _suggestion_detail(s))


def _suggestion_detail(s: dict[str, Any]) -> str:
    if "kv_tokens" in s:
        return f", {s['kv_tokens']:,} KV tokens, {s['max_concurrent_sequences']} seqs, context up to {s['max_context']:,}"
    return f", peak at {s['peak_phase']}"
