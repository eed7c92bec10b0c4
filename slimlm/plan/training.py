"""Training plan: the peak of one steady-state step (optimizer states exist) on each of N devices.

Static memory: weights, fp32 master weights (mixed precision), optimizer states, each sharded by ZeRO
(stage 1: optimizer states and master weights / N; stage 2: + gradients / N; stage 3 = FSDP full shard:
+ weights / N) or moved to CPU RAM by optimizer offload. On top of it the step's timeline is walked and
its largest point is the peak:

  forward      all saved activations + the loss forward (logits, fp32 copy, log-softmax)
  loss backward  saved activations + 12 bytes x vocab per token
  layer j backward (from the last)  gradients of the head and of layers > j + activations of layers <= j
               + that layer's backward workspace (with checkpointing: the inputs of layers <= j + layer j's
               recomputed activations)
  end of backward  all gradients (+ the second [vocab, hidden] gradient a tied embedding accumulates)
  optimizer step   all gradients + the step's temporaries (mixed: fp32 copies of the gradients)

Exact: weights, master weights, gradients, optimizer states (counted per tensor, see `optimizers`).
Estimates: activations (documented formulas in `activations`), workspaces, CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from slimlm.config import ModelConfig
from slimlm.errors import SlimlmError
from slimlm.plan import activations as act
from slimlm.plan.components import Component, device_total, host_total
from slimlm.plan.devices import Device
from slimlm.plan.inference import quantized_linear_bytes
from slimlm.plan.optimizers import (
    LOOKUP_TABLE_BYTES,
    normalize_optimizer,
    optimizer_state_bytes,
    step_workspace_bytes,
)
from slimlm.plan.shapes import LINEAR_NAMES, ParamShape, model_params
from slimlm.settings import arg

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "mixed", "bf16")  # mixed: bf16 compute and weights, fp32 master weights and states


def lora_targets(text: str) -> tuple[str, ...]:
    """--lora-targets: 'all', or a comma list of projection names (with or without '_proj')."""
    if text.strip().lower() in ("all", "all-linear"):
        return LINEAR_NAMES
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    return tuple(n if n.endswith("_proj") else f"{n}_proj" for n in names)


@dataclass
class TrainingSettings:
    method: str = arg("full", choices=METHODS)
    precision: str = arg(
        "mixed", choices=(*PRECISIONS, "bf16-mixed"),
        help="fp32 | mixed (bf16 compute, fp32 master weights; slimlm train's bf16-mixed) | bf16 (pure)",
    )  # fmt: skip
    optimizer: str = arg(
        "adamw", names=("--optim",), aliases=("--optimizer",),
        help="adamw | adamw8bit | adamw4bit | factor4bit | sgd (as slimlm train --optim)",
    )  # fmt: skip
    micro_batch: int = arg(
        1, names=("--batch-size",), aliases=("--micro-batch",), help="sequences per micro-batch and device"
    )
    seq_len: int = arg(2048, names=("--max-seq-len",), aliases=("--seq-len",), help="tokens per sequence")
    gradient_checkpointing: bool = arg(False)
    flash_attention: bool = arg(
        True, names=("--no-flash-attention",), action="store_false",
        help="eager attention (keeps the [heads, S, S] scores)",
    )  # fmt: skip
    lora_rank: int = arg(16)
    lora_targets: tuple[str, ...] = arg(
        LINEAR_NAMES, type=lora_targets, help=f"comma list of {', '.join(LINEAR_NAMES)}, or all (default)"
    )
    lora_dropout: float = arg(  # slimlm train's default is 0.05; > 0 adds each adapter's dropped-out input
        0.0, help="LoRA dropout (default %(default)s): > 0 saves each adapter's dropped-out input"
    )
    qlora_group_size: int = arg(64)
    grad_accumulation: int = arg(1, names=("--grad-accum",), help="micro-batches per optimizer step")
    zero_stage: int = arg(0, help="ZeRO stage 0-3 (3 = FSDP full shard) over --num-devices")
    num_devices: int = arg(1)
    offload_optimizer: bool = arg(False, help="optimizer states and master weights in CPU RAM")
    foreach: bool | None = arg(  # torch optimizers' multi-tensor path; None: torch's default (on for GPUs)
        None, names=("--no-foreach",), action="store_const", const=False,
        help="torch optimizer without the multi-tensor path (for-loop or fused): no list-sized temporaries; "
        "the default follows torch (multi-tensor on GPUs)",
    )  # fmt: skip
    loss_chunk_tokens: int | None = arg(  # None: one loss over the batch (HF); N: chunks of N, recomputed
        None, names=("--loss-chunk",), metavar="TOKENS",
        help="loss over chunks of TOKENS recomputed in the backward (slimlm train: 1024); default: one loss",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SlimlmError(f"unknown training method {self.method!r}; use one of {', '.join(METHODS)}")
        self.precision = {"bf16-mixed": "mixed"}.get(self.precision, self.precision)  # slimlm train's name
        if self.precision not in PRECISIONS:
            raise SlimlmError(
                f"unknown precision {self.precision!r}; use fp32, mixed (bf16 with fp32 master weights) or bf16 (pure)"
            )
        self.optimizer = normalize_optimizer(self.optimizer)
        for name in ("micro_batch", "seq_len", "grad_accumulation", "num_devices"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise SlimlmError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if self.loss_chunk_tokens is not None and (
            not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens <= 0
        ):
            raise SlimlmError(
                f"loss chunk must be a positive number of tokens, got {self.loss_chunk_tokens!r}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise SlimlmError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.method != "full":
            if not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
                raise SlimlmError(f"LoRA rank must be a positive integer, got {self.lora_rank!r}")
            if not isinstance(self.lora_dropout, int | float) or not 0 <= self.lora_dropout < 1:
                raise SlimlmError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout!r}")
            unknown = [t for t in self.lora_targets if t not in LINEAR_NAMES]
            if unknown or not self.lora_targets:
                raise SlimlmError(
                    f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(LINEAR_NAMES)}"
                )
        if self.method == "qlora" and self.qlora_group_size <= 0:
            raise SlimlmError(f"QLoRA group size must be positive, got {self.qlora_group_size}")

    @property
    def compute_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass
class TrainingPlan:
    model: ModelConfig
    device: Device
    settings: TrainingSettings
    components: list[Component]  # what is alive at the peak (device and host)
    peak_phase: str
    phases: dict[str, int]  # device bytes at each point of the step's timeline
    total_parameters: int
    trainable_parameters: int
    model_states: dict[str, int] = field(default_factory=dict)  # per device, unsharded names
    activation_bytes: int = 0  # everything saved for the backward at the end of the forward
    logits_bytes: int = 0  # the loss backward's [tokens, vocab] buffers

    @property
    def total_bytes(self) -> int:
        return device_total(self.components)

    @property
    def host_bytes(self) -> int:
        return host_total(self.components)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device.usable_bytes


def lora_shapes(config: ModelConfig, s: TrainingSettings) -> list[tuple[int, ...]]:
    """A [r, in] and B [out, r] for every adapted projection of every layer."""
    from slimlm.plan.shapes import linear_shapes

    linears = linear_shapes(config)
    if not set(s.lora_targets) & set(linears):  # e.g. qkv_proj on a model with separate q/k/v
        raise SlimlmError(
            f"none of the LoRA targets {', '.join(s.lora_targets)} is a projection of this model; "
            f"choose from {', '.join(linears)}"
        )
    shapes = []
    for _layer in range(config.num_hidden_layers):
        for name, (out_f, in_f) in linears.items():
            if name in s.lora_targets:
                shapes += [(s.lora_rank, in_f), (out_f, s.lora_rank)]
    return shapes


@dataclass
class ModelStates:
    """Unsharded bytes of the model states and what the activation formulas need to know."""

    weights: int
    master: int
    gradients: int
    optimizer: int
    trainable_shapes: list[tuple[int, ...]]
    head_gradients: int  # gradients that exist once the loss backward reached the last layer
    layer_gradients: int  # gradients of one decoder layer
    embedding_gradients: int  # the gradient the embedding backward adds at the end
    largest_layer_weights: int


def model_states(config: ModelConfig, s: TrainingSettings) -> ModelStates:
    params = model_params(config)
    b = s.compute_bytes  # weights and gradients are kept in the compute dtype
    state_bytes = 2 if s.precision == "bf16" and s.optimizer in ("adamw", "sgd") else 4
    if s.method == "full":
        trainable = [p.shape for p in params]
        weights = sum(p.numel for p in params) * b
        grads_per = {p.name: p.numel * b for p in params}
        layer_grads = sum(p.numel for p in params if p.layer == 0) * b
        head = sum(grads_per[p.name] for p in params if p.layer is None and p.kind in ("lm_head", "norm"))
        head += grads_per["model.embed_tokens.weight"] if config.tie_word_embeddings else 0
        embed = grads_per["model.embed_tokens.weight"]
    else:
        trainable = lora_shapes(config, s)
        weights = _frozen_weight_bytes(params, s) + sum(_n(t) for t in trainable) * b
        layer_grads = sum(_n(t) for t in trainable) * b // config.num_hidden_layers
        head, embed = 0, 0
    n_trainable = sum(_n(t) for t in trainable)
    gradients = n_trainable * b
    master = n_trainable * 4 if s.precision == "mixed" else 0
    optimizer = optimizer_state_bytes(trainable, s.optimizer, state_bytes)
    largest_layer = sum(p.numel for p in params if p.layer == 0) * b
    return ModelStates(
        weights, master, gradients, optimizer, trainable, head, layer_grads, embed, largest_layer
    )


def _n(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _frozen_weight_bytes(params: list[ParamShape], s: TrainingSettings) -> int:
    b = s.compute_bytes
    if s.method == "lora":
        return sum(p.numel for p in params) * b
    # QLoRA: 4-bit projections in slimlm's w4 layout, the rest in the compute dtype
    return sum(
        quantized_linear_bytes(*p.shape, 4, s.qlora_group_size) if p.kind == "linear" else p.numel * b
        for p in params
    )


def activation_setup(config: ModelConfig, s: TrainingSettings) -> act.ActivationSetup:
    full = s.method == "full"
    dropout = 0.0 if full else s.lora_dropout
    # Without dropout the adapters' A matmuls save the projections' (shared) inputs; with it, each saves
    # its own dropped-out copy instead (counted from lora_dropout), and the frozen bases save none.
    saved = frozenset(LINEAR_NAMES) if full else frozenset() if dropout else frozenset(s.lora_targets)
    return act.ActivationSetup(
        micro_batch=s.micro_batch,
        seq_len=s.seq_len,
        compute_bytes=s.compute_bytes,
        flash_attention=s.flash_attention,
        saved_inputs=saved,
        lora_targets=frozenset() if full else frozenset(s.lora_targets),
        lora_rank=0 if full else s.lora_rank,
        lora_dropout=dropout,
        norms_train=full,
        lm_head_trains=full,
        input_requires_grad=full,
        checkpointing=s.gradient_checkpointing,
        loss_chunk_tokens=s.loss_chunk_tokens,
    )


def shard(states: ModelStates, s: TrainingSettings) -> dict[str, int]:
    """Per-device model states under ZeRO stage 0-3 over N devices (classic ZeRO paper arithmetic)."""
    n = s.num_devices
    z = s.zero_stage
    return {
        "weights": states.weights // n if z >= 3 else states.weights,
        "gradients": states.gradients // n if z >= 2 else states.gradients,
        "master_weights": states.master // n if z >= 1 else states.master,
        "optimizer_states": states.optimizer // n if z >= 1 else states.optimizer,
    }


def plan_training(
    config: ModelConfig, device: Device, settings: TrainingSettings | None = None
) -> TrainingPlan:
    """Peak memory of one training step per device (see the module docstring for the timeline)."""
    s = settings or TrainingSettings()
    states = model_states(config, s)
    per_device = shard(states, s)
    a = activation_setup(config, s)
    if device.kind == "gpu":  # CUDA's fused dropout keeps a bool mask, the CPU's a noise tensor
        a = replace(a, dropout_mask_bytes=1)
    on_host = s.offload_optimizer
    tables = LOOKUP_TABLE_BYTES.get(s.optimizer, 0)
    static = per_device["weights"] + (
        0 if on_host else per_device["master_weights"] + per_device["optimizer_states"] + tables
    )
    grads_all = per_device["gradients"]
    grad_fraction = grads_all / states.gradients if states.gradients else 0.0
    gather = 2 * states.largest_layer_weights if s.zero_stage == 3 and s.num_devices > 1 else 0
    accum_grads = grads_all if s.grad_accumulation > 1 else 0

    layers = config.num_hidden_layers
    if s.gradient_checkpointing:
        kept = [act.layer_checkpoint_bytes(config, a)] * layers
    else:
        kept = [act.layer_saved_bytes(config, a, first_layer=(j == 0)) for j in range(layers)]
    full_layer = act.layer_saved_bytes(config, a, first_layer=False)
    model_saved = act.model_saved_bytes(config, a)
    work = act.layer_backward_workspace(config, a)
    if s.method == "qlora":  # the 4-bit matmul's backward dequantizes one projection weight at a time
        from slimlm.plan.shapes import linear_shapes

        work += s.compute_bytes * max(o * i for o, i in linear_shapes(config).values())
    activations_all = sum(kept) + model_saved

    phases: dict[str, int] = {}
    detail: dict[str, dict[str, int]] = {}

    def point(name: str, grads: int, activations: int, logits: int, workspace: int) -> None:
        detail[name] = {
            "gradients": grads,
            "activations": activations,
            "logits": logits,
            "workspace": workspace,
        }
        phases[name] = static + grads + activations + logits + workspace

    point("forward", accum_grads, sum(kept), 0, gather + act.layer_forward_workspace(config, a))
    point("loss_forward", accum_grads, activations_all, act.logits_forward_bytes(config, a), gather)
    point("loss_backward", accum_grads, activations_all, act.logits_backward_bytes(config, a), gather)
    head_grads = int(states.head_gradients * grad_fraction)
    layer_grads = int(states.layer_gradients * grad_fraction)
    for j in range(layers - 1, -1, -1):
        done = head_grads + (layers - 1 - j) * layer_grads
        grads = max(done, accum_grads)
        acts = sum(kept[: j + 1]) + act.model_saved_bytes(config, a) - _final_norm_bytes(config, a)
        recompute = full_layer if s.gradient_checkpointing else 0
        point(f"layer_{j}_backward", grads, acts, 0, work + recompute + gather)
    tied_extra = (
        int(states.embedding_gradients * grad_fraction) if config.tie_word_embeddings or accum_grads else 0
    )
    point("backward_end", grads_all, 0, 0, tied_extra)
    step_grads, step_work = _optimizer_step(states, s, grads_all, device)
    if on_host:  # the step, its temporaries and any fp32 gradient copies live in CPU RAM
        host_step = step_work + (step_grads if s.precision == "mixed" else 0)
        step_grads, step_work = grads_all, 0
    point("optimizer_step", step_grads, 0, 0, step_work)

    peak_phase = max(phases, key=lambda k: phases[k])
    d = detail[peak_phase]
    exact_note = "exact count"
    components = [
        Component("weights", per_device["weights"], True, _weights_note(s)),
        Component(
            "master_weights",
            per_device["master_weights"],
            True,
            "fp32 copy of trainable weights",
            host=on_host,
        ),
        Component("optimizer_states", per_device["optimizer_states"], True, s.optimizer, host=on_host),
        Component("optimizer_tables", tables, False, "code-table lookups slimlm.optim caches", host=on_host),
        Component(
            "gradients", d["gradients"], True, f"alive at {peak_phase}" if d["gradients"] else exact_note
        ),
        Component("activations", d["activations"], False, "saved for backward, formula in docs/plan.md"),
        Component("logits", d["logits"], False, "loss over batch x seq x vocab"),
        Component("workspace", d["workspace"], False, "transients at the peak"),
    ]
    if on_host:
        components.append(
            Component("optimizer_step_host", host_step, False, "step temporaries in RAM", host=True)
        )
    if device.kind == "gpu":
        components.append(Component("cuda_context", device.cuda_context_bytes, False, "CUDA context"))
        for k in phases:
            phases[k] += device.cuda_context_bytes
    components = [c for c in components if c.bytes or c.name in ("weights", "activations")]
    total_params = config.num_parameters()
    trainable = sum(_n(t) for t in states.trainable_shapes)
    return TrainingPlan(
        config, device, s, components, peak_phase, phases, total_params, trainable, per_device,
        activations_all, act.logits_backward_bytes(config, a),
    )  # fmt: skip


def _final_norm_bytes(config: ModelConfig, a: act.ActivationSetup) -> int:
    """The final norm and lm_head inputs are released once the loss backward passed them."""
    h, b = config.hidden_size, a.compute_bytes
    per_token = 4 * h + 4 + (b * h if a.norms_train else 0) + (b * h if a.lm_head_trains else 0) + 8
    return per_token * a.tokens


def _optimizer_step(states: ModelStates, s: TrainingSettings, grads: int, device: Device) -> tuple[int, int]:
    """(gradient bytes alive during the step, step temporaries)."""
    foreach = s.foreach if s.foreach is not None else device.kind == "gpu"
    param_bytes = 4 if s.precision in ("fp32", "mixed") else 2
    state_bytes = 2 if s.precision == "bf16" and s.optimizer in ("adamw", "sgd") else 4
    shapes = states.trainable_shapes
    work = step_workspace_bytes(shapes, s.optimizer, state_bytes, param_bytes, foreach)
    if s.precision == "mixed":
        fraction = grads / states.gradients if states.gradients else 0
        return int(sum(_n(t) for t in shapes) * 4 * fraction), work  # fp32 copies replace the bf16 gradients
    return grads, work


def _weights_note(s: TrainingSettings) -> str:
    dtype = {4: "fp32", 2: "bf16"}[s.compute_bytes]
    if s.method == "qlora":
        return f"4-bit projections (group {s.qlora_group_size}) + {dtype} rest + {dtype} adapters"
    if s.method == "lora":
        return f"{dtype} base + {dtype} adapters (rank {s.lora_rank})"
    return dtype


def with_training_changes(plan: TrainingPlan, **changes) -> TrainingPlan:
    import dataclasses

    return plan_training(plan.model, plan.device, dataclasses.replace(plan.settings, **changes))


def suggest_training(plan: TrainingPlan, limit: int = 4) -> list[dict]:
    """Nearest settings that fit: single changes first (in order of how much they change the run), then
    the same changes applied one on top of the other."""
    if plan.fits:
        return []
    s = plan.settings
    steps: list[tuple[str, dict]] = []
    if not s.gradient_checkpointing:
        steps.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if s.micro_batch > 1:
        accum = s.grad_accumulation * s.micro_batch
        steps.append(
            (f"--micro-batch 1 --grad-accum {accum}", {"micro_batch": 1, "grad_accumulation": accum})
        )
    if s.optimizer in ("adamw", "adamw8bit"):
        steps.append(("--optimizer adamw4bit" if s.optimizer == "adamw8bit" else "--optimizer adamw8bit",
                      {"optimizer": "adamw4bit" if s.optimizer == "adamw8bit" else "adamw8bit"}))  # fmt: skip
    if s.num_devices > 1 and s.zero_stage < 3:
        steps.append(("--zero-stage 3", {"zero_stage": 3}))
    if not s.offload_optimizer:
        steps.append(("--offload-optimizer", {"offload_optimizer": True}))
    if s.method == "full":
        steps.append(("--method lora", {"method": "lora"}))
    if s.method in ("full", "lora"):
        steps.append(("--method qlora", {"method": "qlora"}))
    tries = list(steps)
    labels: dict[tuple[str, ...], str] = {}  # a later change of the same settings replaces the earlier one
    merged: dict = {}
    for label, change in steps:
        labels.pop(tuple(sorted(change)), None)
        labels[tuple(sorted(change))] = label
        merged = {**merged, **change}
        if len(labels) > 1:
            tries.append((" ".join(labels.values()), dict(merged)))
    out: list[dict] = []
    for label, change in tries:
        candidate = with_training_changes(plan, **change)
        if candidate.fits:
            out.append(
                {"change": label, "total_bytes": candidate.total_bytes, "peak_phase": candidate.peak_phase}
            )
        if len(out) >= limit:
            break
    return out


__all__ = [
    "ModelStates",
    "TrainingPlan",
    "TrainingSettings",
    "model_states",
    "plan_training",
    "shard",
    "suggest_training",
]
