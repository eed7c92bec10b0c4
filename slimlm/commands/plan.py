"""`slimlm plan`: will it fit? Flags, then one table (or JSON, or a plot). The lead's CLI calls these two."""

from __future__ import annotations

import argparse
import json

from slimlm.errors import SlimlmError


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    from slimlm.commands.common import add_engine_args
    from slimlm.formats.sizes import parse_size

    g = p.add_argument_group("what and where")
    g.add_argument(
        "--model",
        "-m",
        default=None,
        help="preset (e.g. llama-3-8b, see --list), HF directory, config.json, .gguf, or smollm2-135m (default)",
    )
    g.add_argument(
        "--device",
        default=None,
        help="GPU preset (rtx3090, rtx4090, a6000, a100-40g, a100-80g, h100-80g, ...), cpu (this machine's RAM) "
        "or cuda (the local GPU); default: the local GPU if any, else cpu",
    )
    g.add_argument(
        "--device-memory", default=None, help="memory of one device: 24GiB (2^30 B) or 24GB (10^9 B)"
    )
    g.add_argument(
        "--cuda-context",
        type=parse_size,
        default=None,
        help="CUDA context size (default 512MiB, an estimate)",
    )
    g.add_argument("--mode", choices=("inference", "training", "train"), default="inference")
    g.add_argument("--list", action="store_true", help="list the model and device presets and exit")

    g = p.add_argument_group("inference")
    g.add_argument(
        "--weights", default="auto", help="auto | fp32 | bf16 | fp16 | w8 | w4 (default: the compute dtype)"
    )
    g.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="w8/w4 quantization group size (-1: per channel); default as `slimlm quantize`: the largest "
        "of 128/64/32 that divides every input width of the model",
    )
    g.add_argument(
        "--embeddings", choices=("auto", "quantize", "float"), default="auto",
        help="w8/w4: embedding and lm_head quantized or in the compute dtype (as `slimlm quantize`; "
        "auto: quantized for w4, float for w8)",
    )  # fmt: skip
    g.add_argument("--keep-embeddings-float", dest="embeddings", action="store_const", const="float",
                   help="alias of --embeddings float")  # fmt: skip
    g.add_argument("--dtype", default="auto", help="compute dtype: auto | fp32 | bf16 | fp16")
    g.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens per sequence to plan for (default min(4096, max-model-len))",
    )
    g.add_argument("--batch", type=int, default=1, help="sequences in flight at that context (default 1)")
    g.add_argument(
        "--no-overheads", action="store_true", help="count weights and KV only (the classic arithmetic)"
    )
    add_engine_args(p)

    # The trainer's flags and optimizer names (slimlm train --optim/--batch-size/--max-seq-len); the planner's
    # old spellings stay accepted with a note. The LoRA dropout defaults to the trainer's.
    from slimlm.plan.training import TrainingSettings
    from slimlm.settings import add_fields, field_default
    from slimlm.train.config import TrainConfig

    add_fields(p.add_argument_group("training"), TrainingSettings,
               lora_dropout=field_default(TrainConfig, "lora_dropout"))  # fmt: skip

    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the plan as JSON (schema slimlm.plan/1)")
    g.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="memory vs context and vs batch, stacked by component",
    )
    g.add_argument("--units", choices=("GiB", "GB"), default="GiB", help="table units (JSON is always bytes)")


def _compute_dtype(requested: str, device_kind: str) -> str:
    from slimlm.plan.inference import normalize_float_dtype

    if requested != "auto":
        return normalize_float_dtype(requested)
    if device_kind == "gpu":
        return "bf16"
    import torch

    from slimlm.engine.llm import resolve_dtype

    return normalize_float_dtype(resolve_dtype("auto", torch.device("cpu")))


def _weight_format(
    requested: str, dtype: str, config, embeddings: str | bool = "auto"
) -> tuple[str, int | None, bool]:
    """(format, group size or None for --group-size, whether embeddings are quantized).

    `embeddings` is --embeddings (auto: quantized, as `slimlm quantize`); a bool is the old keep-float flag."""
    from slimlm.formats.weights import WEIGHT_BITS, quantize_embeddings_for
    from slimlm.plan.inference import normalize_weight_format

    if isinstance(embeddings, bool):
        embeddings = "float" if embeddings else "auto"
    q = _checkpoint_quantization(requested, config)
    if q:  # a quantized checkpoint keeps its format; older ones kept float embeddings
        return f"w{q['bits']}", q.get("group_size"), bool(q.get("quantize_embeddings", False))
    fmt = requested if requested != "auto" else dtype
    bits = WEIGHT_BITS.get(normalize_weight_format(fmt), 16)
    return fmt, None, quantize_embeddings_for(embeddings, bits)


def _checkpoint_choices(requested: str, config) -> dict:
    """A quantized checkpoint's per-tensor choices that change its bytes: the embedding table's own bits
    and group size and per-linear group sizes (`slimlm quantize --embedding-bits / --embedding-group-size
    / --group-sizes`). A checkpoint that names no table group has the rule of its time (legacy)."""
    from slimlm.formats.weights import table_group_size

    q = _checkpoint_quantization(requested, config)
    if not q:
        return {}
    bits = int(q["bits"])
    table = q.get("embedding_group_size")
    if table is None:
        table = table_group_size(bits, int(q.get("embedding_bits") or bits), q.get("group_size"), legacy=True)
    return {"embedding_bits": q.get("embedding_bits"), "group_sizes": q.get("group_sizes"),
            "embedding_group_size": table}  # fmt: skip


def _checkpoint_zeros(requested: str, config) -> dict:
    """A quantized checkpoint's symmetry and act-order, which change its bytes in the C kernel's layout."""
    q = _checkpoint_quantization(requested, config)
    if not q:
        return {}
    return {
        "sym": q.get("sym"),
        "act_order": bool(q.get("act_order")),
        "head_method": q.get("head_method", "rtn"),
        "fp16_scales": bool(q.get("fp16_scales")),
    }


def quantized_runtime_layout(config, settings, device_kind: str) -> str:
    """ "kernel" where the engine will hold these quantized weights in the C kernel's layout, as
    engine/backend.py `quantized_layout` decides for this machine, else "torch"."""
    from slimlm.formats.weights import WEIGHT_BITS
    from slimlm.plan.inference import FLOAT_BYTES

    if settings.weight_format in FLOAT_BYTES or device_kind != "cpu" or settings.dtype != "bf16":
        return "torch"
    import torch

    from slimlm.engine.backend import quantized_layout
    from slimlm.plan.kernel_weights import kernel_reason

    if quantized_layout(settings.engine, torch.device("cpu"), torch.bfloat16) != "kernel":
        return "torch"
    reason = kernel_reason(
        config, WEIGHT_BITS[settings.weight_format], settings.group_size,
        quantize_embeddings=settings.quantize_embeddings, embedding_bits=settings.embedding_bits,
        group_sizes=settings.group_sizes, embedding_group_size=settings.embedding_group_size,
    )  # fmt: skip
    return "torch" if reason else "kernel"


def _checkpoint_quantization(requested: str, config) -> dict | None:
    """The checkpoint's quantization config where `--weights auto` keeps a quantized checkpoint's format."""
    q = config.quantization or {}
    return q if requested == "auto" and q.get("bits") in (4, 8) else None


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def build_plan(args: argparse.Namespace):
    """(planned model, plan, suggestions) from parsed flags."""
    from slimlm.plan.devices import describe_device
    from slimlm.plan.models import resolve_model
    from slimlm.plan.shapes import fitting_group_size

    pm = resolve_model(args.model)
    device_name = args.device if (args.device or args.device_memory) else _default_device()
    device = describe_device(device_name, args.device_memory, args.cuda_context)
    dtype = _compute_dtype(args.dtype, device.kind)
    if args.mode == "inference":
        from slimlm.commands.common import engine_config_from_args
        from slimlm.plan.serving import InferenceSettings, plan_inference, suggest

        fmt, group, quantize_embeddings = _weight_format(args.weights, dtype, pm.config, args.embeddings)
        settings = InferenceSettings(
            weight_format=fmt, group_size=group or args.group_size or fitting_group_size(pm.config), dtype=dtype, context=args.context,
            batch=args.batch, engine=engine_config_from_args(args), runtime_overheads=not args.no_overheads,
            quantize_embeddings=quantize_embeddings, **_checkpoint_choices(args.weights, pm.config),
            **_checkpoint_zeros(args.weights, pm.config),
        )  # fmt: skip
        settings.layout = quantized_runtime_layout(pm.config, settings, device.kind)
        plan = plan_inference(pm.config, device, settings)
        return pm, plan, suggest(plan)
    from slimlm.plan.training import TrainingSettings, plan_training, suggest_training
    from slimlm.settings import from_args

    settings = from_args(TrainingSettings, args)
    plan = plan_training(pm.config, device, settings)
    return pm, plan, suggest_training(plan)


def _print_presets() -> None:
    from rich.console import Console
    from rich.table import Table

    from slimlm.plan.devices import gpu_presets
    from slimlm.plan.models import model_presets, preset_model
    from slimlm.plan.units import GiB

    console = Console()
    models = Table(title="model presets", title_justify="left")
    for col in ("name", "model", "params", "layers", "heads / kv", "vocab", "runs in slimlm"):
        models.add_column(col)
    for key in model_presets():
        pm = preset_model(key)
        c = pm.config
        models.add_row(key, pm.name, f"{c.num_parameters() / 1e9:.2f} B", str(c.num_hidden_layers),
                       f"{c.num_attention_heads} / {c.num_key_value_heads}", str(c.vocab_size),
                       "yes" if pm.runs_in_slimlm else "plan only")  # fmt: skip
    console.print(models)
    devices = Table(title="device presets", title_justify="left")
    for col in ("name", "device", "GiB (2^30 B)"):
        devices.add_column(col)
    for key, d in gpu_presets().items():
        devices.add_row(key, d["name"], f"{d['total_mib'] * 2**20 / GiB:.2f}")
    devices.add_row("cpu", "this machine's RAM (MemAvailable)", "")
    console.print(devices)


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan (table, or JSON with --json); write the plot with --plot. 0 whether or not it fits."""
    if args.list:
        _print_presets()
        return 0
    if args.mode == "train":
        args.mode = "training"
    flags = {"batch": "--batch", "micro_batch": "--batch-size", "seq_len": "--max-seq-len",
             "num_devices": "--num-devices", "grad_accumulation": "--grad-accum"}  # fmt: skip
    for name, flag in flags.items():
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise SlimlmError(f"{flag} must be positive, got {value}")
    if args.context is not None and args.context <= 0:
        raise SlimlmError(f"--context must be positive, got {args.context}")
    from slimlm.plan.report import plan_to_json, render_table

    pm, plan, suggestions = build_plan(args)
    doc = plan_to_json(pm, plan, suggestions)
    if args.plot:
        from slimlm.plan.plot import plot_plan

        plot_plan(plan, args.plot, title=f"{pm.name} on {plan.device.name} ({doc['mode']})")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        render_table(doc, args.units)
        if args.plot:
            print(f"wrote {args.plot}")
    return 0
