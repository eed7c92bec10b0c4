"""Inference plan: weights + KV pool + runtime overheads on one device, the workload it holds, a verdict.

The KV pool follows the engine exactly (`slimlm.engine.memory.plan_kv_blocks`): a fraction
`cache_max_entry_count` of the memory free after the CUDA context and the weights, in whole blocks,
capped at max_num_seqs full-length sequences, or an absolute token / byte budget. Weights and KV
blocks are exact (`slimlm.plan.inference`). The CUDA context, the step workspace and the logits /
sampling buffers are estimates (see `runtime_overheads`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from slimlm.config import ModelConfig
from slimlm.engine.config import EngineConfig
from slimlm.errors import SlimlmError
from slimlm.formats.weights import WEIGHT_BITS
from slimlm.plan.components import Component, device_total
from slimlm.plan.devices import Device
from slimlm.plan.inference import (
    FLOAT_BYTES,
    kv_block_bytes,
    kv_staging_bytes,
    normalize_float_dtype,
    normalize_kv_dtype,
    normalize_weight_format,
    weight_bytes,
)

SAMPLER_BYTES_PER_LOGIT = 32  # fp32 logits, a penalised copy, sort values + int64 indices, softmax, cumsum


@dataclass
class InferenceSettings:
    """Weight format, compute dtype and workload; the KV pool settings are the engine's `EngineConfig`."""

    weight_format: str = "bf16"  # fp32 | bf16 | fp16 | w8 | w4
    group_size: int = 128
    dtype: str = "bf16"  # compute dtype: activations and the tensors w8/w4 leave unquantized
    context: int | None = None  # tokens per sequence the workload needs (default: min(4096, max_model_len))
    batch: int = 1  # sequences that must be in flight together at that context
    engine: EngineConfig = field(default_factory=EngineConfig)
    runtime_overheads: bool = True  # False: the classic arithmetic (weights + KV only)
    # embedding and lm_head quantized; None: as quantize's auto (always)
    quantize_embeddings: bool | None = None
    # a quantized checkpoint's own choices (`quantize --embedding-bits / --group-sizes`), read from its config
    embedding_bits: int | None = None
    group_sizes: dict[str, int] | None = None
    embedding_group_size: int | None = None  # the table's group (None: formats.weights.table_group_size)
    # how the engine will hold quantized weights: "torch" (QuantLinear) or "kernel" (the C kernel's layout,
    # slimlm/plan/kernel_weights.py), and the checkpoint's choices that change the kernel's bytes
    layout: str = "torch"
    sym: bool | None = None  # None: quantize's default (symmetric at 8 bits)
    act_order: bool = False
    head_method: str = "rtn"  # a grouped 8-bit table: rtn's Q8_0 grid keeps fp16 scales, gptq's float32
    # (d, m) fp16-exact, as `quantize` makes them since issue 15's w8 pass (older checkpoints: False)
    fp16_scales: bool = True

    def __post_init__(self) -> None:
        self.weight_format = normalize_weight_format(self.weight_format)
        self.dtype = normalize_float_dtype(self.dtype)
        if self.weight_format in FLOAT_BYTES:
            self.dtype = self.weight_format
        if self.quantize_embeddings is None:  # `slimlm quantize --embeddings auto`
            self.quantize_embeddings = self.weight_format in ("w4", "w8")
        if self.group_size is None or self.group_size == 0 or self.group_size < -1:
            raise SlimlmError(f"group size must be positive (or -1 for per-channel), got {self.group_size}")
        if self.context is not None and self.context <= 0:
            raise SlimlmError(f"context must be a positive number of tokens, got {self.context}")
        if self.batch <= 0:
            raise SlimlmError(f"batch must be a positive number of sequences, got {self.batch}")

    @property
    def kv_dtype(self) -> str:
        return self.dtype if self.engine.kv_dtype == "auto" else normalize_kv_dtype(self.engine.kv_dtype)


@dataclass
class InferencePlan:
    model: ModelConfig
    device: Device
    settings: InferenceSettings
    components: list[Component]
    kv_bytes_per_token: int
    kv_block_bytes: int
    kv_blocks: int
    kv_budget_source: str
    max_model_len: int
    context: int
    max_concurrent_sequences: int  # at `context`, limited by the pool and by max_num_seqs
    max_context: int  # at `batch`, limited by the pool and by max_model_len
    problems: list[str]
    runtime: RuntimeOverheads | None = None

    @property
    def total_bytes(self) -> int:
        return device_total(self.components)

    @property
    def kv_tokens(self) -> int:
        return self.kv_blocks * self.settings.engine.block_size

    @property
    def fits(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class RuntimeOverheads:
    """Transient memory of an engine step (estimates). The three never coexist: the logits are computed
    after the last layer's workspace is released, so the step needs their maximum."""

    prefill_workspace: int
    decode_workspace: int
    logits: int

    @property
    def peak(self) -> int:
        return max(self.prefill_workspace, self.decode_workspace, self.logits)

    @property
    def largest(self) -> str:
        parts = {"prefill activations": self.prefill_workspace, "decode K/V gather": self.decode_workspace,
                 "logits + sampler": self.logits}  # fmt: skip
        return max(parts, key=lambda k: parts[k])


def runtime_overheads(
    config: ModelConfig, settings: InferenceSettings, context: int, max_model_len: int
) -> RuntimeOverheads:
    """Step workspace and logits buffers, estimated for slimlm's engine, one layer at a time (nothing is
    kept between layers at inference).

    Prefill: the scheduler packs up to T = min(max_num_batched_tokens, batch x context) prompt tokens in a
    step; it holds the residual stream and the normed input (2·T·h), the larger of the SwiGLU MLP's three
    [T, i] intermediates and attention's q plus its RoPE temporaries, k, v (4·T·q + 2·T·kv), all in the
    compute dtype, plus the K/V of the context it attends to, gathered from the pool into the compute
    dtype (2·context·kv). Decode: B = min(batch, max_num_seqs) sequences gather every sequence's K/V of
    one layer, padded to the longest (2·B·context·kv). Logits: one fp32 row of vocab logits per sequence
    of the step and the sampler's copies (~32 bytes per logit).
    """
    b = FLOAT_BYTES[settings.dtype]
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    engine = settings.engine
    seqs = min(settings.batch, engine.max_num_seqs)
    tokens = min(engine.max_num_batched_tokens, seqs * context)
    per_token = 2 * h + max(3 * i, 4 * q + 2 * kv)
    prefill = tokens * per_token * b + 2 * context * kv * b
    decode = 2 * seqs * min(context, max_model_len) * kv * b
    logits = seqs * config.vocab_size * SAMPLER_BYTES_PER_LOGIT
    return RuntimeOverheads(prefill, decode, logits)


def _kv_blocks(
    free_after_weights: int, block_bytes: int, engine: EngineConfig, max_model_len: int
) -> tuple[int, str]:
    from slimlm.engine.memory import plan_kv_blocks

    try:
        budget = plan_kv_blocks(
            block_bytes=block_bytes,
            block_size=engine.block_size,
            free_bytes=max(free_after_weights, 0),
            cache_max_entry_count=engine.cache_max_entry_count,
            kv_cache_tokens=engine.kv_cache_tokens,
            kv_cache_bytes=engine.kv_cache_bytes,
            max_num_seqs=engine.max_num_seqs,
            max_model_len=max_model_len,
        )
    except SlimlmError:
        return 0, "no block fits"
    return budget.num_blocks, budget.source


def _weights_bytes(config: ModelConfig, s: InferenceSettings) -> int:
    """The weights as the engine will hold them: PyTorch's layout, or the C kernel's for quantized ones."""
    if s.layout == "kernel" and s.weight_format not in FLOAT_BYTES:
        from slimlm.plan.kernel_weights import kernel_weight_bytes

        bits = WEIGHT_BITS[s.weight_format]
        return kernel_weight_bytes(
            config, bits, s.group_size, dtype=s.dtype, quantize_embeddings=s.quantize_embeddings,
            embedding_bits=s.embedding_bits, group_sizes=s.group_sizes, embedding_group_size=s.embedding_group_size,
            sym=bits == 8 if s.sym is None else s.sym, act_order=s.act_order, head_method=s.head_method,
            fp16_scales=s.fp16_scales,
        )  # fmt: skip
    return weight_bytes(
        config, s.weight_format, s.group_size, dtype=s.dtype, quantize_embeddings=s.quantize_embeddings,
        embedding_bits=s.embedding_bits, group_sizes=s.group_sizes, embedding_group_size=s.embedding_group_size,
        sym=s.sym, head_method=s.head_method,
    )  # fmt: skip


def plan_inference(
    config: ModelConfig, device: Device, settings: InferenceSettings | None = None
) -> InferencePlan:
    """Memory breakdown, KV capacity and verdict for serving `config` on `device` (see module docstring)."""
    s = settings or InferenceSettings()
    engine = s.engine
    max_model_len = engine.max_model_len or config.max_position_embeddings
    context = s.context or min(4096, max_model_len)
    weights = _weights_bytes(config, s)
    cuda_context = device.cuda_context_bytes if s.runtime_overheads else 0
    block_bytes = kv_block_bytes(config, s.kv_dtype, engine.block_size)
    free_after_weights = device.usable_bytes - cuda_context - weights
    blocks, source = _kv_blocks(free_after_weights, block_bytes, engine, max_model_len)
    runtime = runtime_overheads(config, s, context, max_model_len) if s.runtime_overheads else None

    fmt = (
        s.weight_format
        if s.weight_format in FLOAT_BYTES
        else f"{s.weight_format} g{s.group_size}{'' if s.quantize_embeddings else ' (float embeddings)'}, rest {s.dtype}"
        + (" (C kernel layout)" if s.layout == "kernel" else "")
    )
    components = [
        Component("weights", weights, True, fmt),
        Component(
            "kv_cache", blocks * block_bytes, True, f"{blocks} blocks x {block_bytes} B ({s.kv_dtype})"
        ),
    ]
    staging = kv_staging_bytes(config, s.kv_dtype, engine.block_size, engine.max_num_seqs)
    if staging:
        note = f"bf16 blocks not yet full, {2 * engine.max_num_seqs + 1} slots (2 x max_num_seqs + 1)"
        components.append(Component("kv_staging", staging, True, note))
    if device.kind == "gpu" and s.runtime_overheads:
        components.append(Component("cuda_context", cuda_context, False, "CUDA context, before any tensor"))
    if runtime is not None:
        note = f"step transients; largest: {runtime.largest}"
        components.append(Component("workspace", runtime.peak, False, note))

    seq_blocks = -(-context // engine.block_size)
    max_seqs = min(blocks // seq_blocks, engine.max_num_seqs)
    max_context = min((blocks // s.batch) * engine.block_size, max_model_len)
    problems = _problems(
        weights, cuda_context, device, components, blocks, seq_blocks, context, max_model_len, s
    )
    plan = InferencePlan(
        config, device, s, components, round(block_bytes / engine.block_size), block_bytes, blocks, source,
        max_model_len, context, max_seqs, max_context, problems, runtime,
    )  # fmt: skip
    return plan


def _problems(
    weights, cuda_context, device, components, blocks, seq_blocks, context, max_model_len, s
) -> list[str]:
    out = []
    if weights + cuda_context > device.usable_bytes:
        out.append("the weights alone do not fit")
    elif device_total(components) > device.usable_bytes:
        out.append("weights + KV pool + runtime overheads exceed the device; lower --cache-max-entry-count")
    if context > max_model_len:
        out.append(f"context {context} is longer than max_model_len {max_model_len}")
    if s.batch > s.engine.max_num_seqs:
        out.append(f"batch {s.batch} is more than max_num_seqs {s.engine.max_num_seqs}")
    if blocks < s.batch * seq_blocks and weights + cuda_context <= device.usable_bytes:
        out.append(
            f"the KV pool holds {blocks * s.engine.block_size} tokens; {s.batch} x {context} needs {s.batch * seq_blocks * s.engine.block_size}"
        )
    return out


def with_changes(plan: InferencePlan, **changes) -> InferencePlan:
    """The same plan with some settings changed (engine fields included)."""
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    engine = dataclasses.replace(
        plan.settings.engine, **{k: v for k, v in changes.items() if k in engine_fields}
    )
    rest = {k: v for k, v in changes.items() if k not in engine_fields}
    settings = dataclasses.replace(plan.settings, engine=engine, **rest)
    return plan_inference(plan.model, plan.device, settings)


def suggest(plan: InferencePlan, limit: int = 4) -> list[dict]:
    """Nearest configurations that fit, smallest change first: the same model with a smaller batch or
    context, a smaller cache fraction, a quantized KV cache, then quantized weights."""
    if plan.fits:
        return []
    s, e = plan.settings, plan.settings.engine
    tries: list[tuple[str, dict]] = []
    if plan.max_concurrent_sequences >= 1 and plan.max_concurrent_sequences < s.batch:
        tries.append((f"batch {plan.max_concurrent_sequences}", {"batch": plan.max_concurrent_sequences}))
    if plan.max_context >= e.block_size and plan.max_context < plan.context:
        tries.append((f"context {plan.max_context}", {"context": plan.max_context}))
    needed_blocks = s.batch * -(-plan.context // e.block_size)
    if e.kv_cache_tokens is not None:
        tokens = needed_blocks * e.block_size
        tries.append((f"--kv-cache-tokens {tokens}", {"kv_cache_tokens": tokens}))
    if e.kv_cache_bytes is not None:
        size = needed_blocks * plan.kv_block_bytes
        tries.append((f"--kv-cache-bytes {size}", {"kv_cache_bytes": size}))
    for fraction in (0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1):
        if e.kv_cache_tokens is None and e.kv_cache_bytes is None and fraction < e.cache_max_entry_count:
            tries.append((f"--cache-max-entry-count {fraction}", {"cache_max_entry_count": fraction}))
    for kv in ("int8", "int4"):
        if s.kv_dtype in ("fp32", "bf16", "fp16") or (kv == "int4" and s.kv_dtype == "int8"):
            tries.append((f"--kv-dtype {kv}", {"kv_dtype": kv}))
    for fmt in ("bf16", "w8", "w4"):
        if (fmt == "bf16" and s.weight_format == "fp32") or (
            fmt in ("w8", "w4") and s.weight_format not in ("w4",)
        ):
            if fmt == "w8" and s.weight_format == "w8":
                continue
            tries.append((f"--weights {fmt}", {"weight_format": fmt}))
            tries.append((f"--weights {fmt} --kv-dtype int8", {"weight_format": fmt, "kv_dtype": "int8"}))
    out: list[dict] = []
    seen: set[str] = set()
    for label, change in tries:
        try:
            candidate = with_changes(plan, **change)
        except SlimlmError:
            continue
        if candidate.fits and label not in seen:
            seen.add(label)
            out.append({
                "change": label,
                "total_bytes": candidate.total_bytes,
                "kv_tokens": candidate.kv_tokens,
                "max_concurrent_sequences": candidate.max_concurrent_sequences,
                "max_context": candidate.max_context,
            })  # fmt: skip
        if len(out) >= limit:
            break
    return out
