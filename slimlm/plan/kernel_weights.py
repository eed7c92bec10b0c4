"""Bytes of a quantized model in the C decode kernel's layout (kernels/qweights.py), for the planner.

A bf16 CPU engine with the kernel holds a quantized checkpoint this way (engine/backend.py:
`quantized_layout`, the one place that decides); elsewhere it keeps PyTorch's QuantLinear layout
(`slimlm.plan.inference.weight_bytes`). The kernel's layout differs from that one in three ways:

- rows are padded to a multiple of 16 (one tile), per fused weight: q/k/v and gate/up are one weight each;
- every group has a scale d and a minimum m (w = d·code + m), both fp16 where every d and m of the tensor
  survives fp16 exactly, else both float32 (kernels/qweights.py `pack`). Which one a slimlm checkpoint
  gets follows from how `slimlm quantize` stores its scales (measured against the engine in
  tests/test_plan_engine_parity.py). Checkpoints whose config says `"fp16_scales": true` (every 4-bit
  and symmetric one `quantize` makes since issue 15's w8 pass: quant/kernel_scales.py rounds d and m
  onto fp16 before the codes are taken, in groups of 32/64/128; per-channel grids are left) are fp16. Older ones: symmetric per-channel int8
  (bf16 scales, m = −128·d) and rtn's int8 g32 table (Q8_0's fp16 grid) fit fp16; everything else is
  float32 — integer zero points (m = −z·d needs up to 12 significant bits, fp16 has 11), float zero
  points (m = −z·d computed from a float32 z) and grouped int8 (float32 scales). A tensor whose every
  value happens to fit fp16 would be held smaller than planned;
- act-order (GPTQ) adds one int32 input permutation per fused weight.
"""

from __future__ import annotations

from slimlm.config import ModelConfig
from slimlm.formats.dtypes import FLOAT_BYTES, float_dtype_name
from slimlm.formats.weights import linear_group_size, table_group_size
from slimlm.kernels.qweights import TILE as TILE_ROWS
from slimlm.models.prepack import FUSIONS
from slimlm.plan.shapes import model_params

FUSED = tuple(parts for _fused, parts in FUSIONS)  # q/k/v and gate/up: one weight each in the kernel


def kernel_scale_bytes(bits: int, per_channel: bool, sym: bool, fp16_scales: bool = False) -> int:
    """Bytes of one of d or m (module docstring): fp16 for a checkpoint with fp16-exact scales (groups of a
    4-bit or symmetric grid; per-channel grids are not rounded) and for symmetric per-channel int8, else
    float32."""
    if fp16_scales and not per_channel and (bits == 4 or sym):
        return 2
    return 2 if bits == 8 and per_channel and sym else 4


def kernel_linear_bytes(rows: int, k: int, bits: int, group: int | None, scale_bytes: int) -> int:
    """One weight [rows, k] in the kernel's layout: codes and (d, m) per group, rows padded to 16."""
    padded = -(-rows // TILE_ROWS) * TILE_ROWS
    group = k if not group or group <= 0 else group
    return padded * k * bits // 8 + padded * (k // group) * 2 * scale_bytes


def _fused_weights(config: ModelConfig):
    """(layer, [(name, (out, in)), ...]) for each weight the kernel holds: q/k/v and gate/up fused."""
    by_layer: dict[int, dict[str, tuple[int, int]]] = {}
    for p in model_params(config):
        if p.kind == "linear":
            name = p.name.removeprefix(f"model.layers.{p.layer}.").removesuffix(".weight")
            by_layer.setdefault(p.layer, {})[name] = p.shape
    for layer, linears in by_layer.items():
        short = {name.split(".")[-1]: name for name in linears}
        taken: set[str] = set()
        for parts in FUSED:
            if all(part in short for part in parts):
                yield layer, [(short[part], linears[short[part]]) for part in parts]
                taken.update(parts)
        for part, name in short.items():
            if part not in taken:
                yield layer, [(name, linears[name])]


def kernel_reason(config: ModelConfig, bits: int, group_size: int | None, *, quantize_embeddings: bool,
                  embedding_bits: int | None = None, group_sizes: dict[str, int] | None = None,
                  embedding_group_size: int | None = None) -> str | None:  # fmt: skip
    """None when the kernel runs this quantized model, else why not (the engine's rule,
    kernels/qlayout.py `quantized_reason`, on shapes instead of modules)."""
    from slimlm.kernels.qweights import kernel_scheme_reason

    for layer, weights in _fused_weights(config):
        schemes = set()
        for name, (_, k) in weights:
            g = linear_group_size(group_sizes, layer, name, group_size)
            g = k if not g or g <= 0 else g
            reason = kernel_scheme_reason(bits, g, k)
            if reason:
                return reason
            schemes.add(g)
        if len(schemes) > 1:
            return "q/k/v or gate/up differ in bits, group size or act-order: the kernel fuses them"
    if quantize_embeddings:
        ebits = embedding_bits or bits
        h = config.hidden_size
        group = table_group_size(bits, ebits, group_size, embedding_group_size)
        group = h if not group or group <= 0 else group
        reason = kernel_scheme_reason(ebits, group, h)
        if reason:
            return f"the embedding table: {reason}"
    return None


def kernel_weight_bytes(
    config: ModelConfig,
    bits: int,
    group_size: int | None,
    *,
    dtype: str = "bf16",
    quantize_embeddings: bool,
    embedding_bits: int | None = None,
    group_sizes: dict[str, int] | None = None,
    embedding_group_size: int | None = None,
    sym: bool = False,
    act_order: bool = False,
    head_method: str = "rtn",
    fp16_scales: bool = False,
) -> int:
    """Bytes of every weight as the kernel holds them (module docstring), float tensors in `dtype`."""
    rest = FLOAT_BYTES[float_dtype_name(dtype)]
    total = 0
    for layer, weights in _fused_weights(config):
        name, (_, k) = weights[0]
        rows = sum(shape[0] for _, shape in weights)
        group = linear_group_size(group_sizes, layer, name, group_size)
        scale = kernel_scale_bytes(bits, not group or group <= 0 or group == k, sym, fp16_scales)
        total += kernel_linear_bytes(rows, k, bits, group, scale)
        if act_order:
            total += k * 4
    for p in model_params(config):
        if p.kind == "linear":
            continue
        if p.kind in ("embedding", "lm_head") and quantize_embeddings:
            ebits = embedding_bits or bits
            table = table_group_size(bits, ebits, group_size, embedding_group_size)
            per_channel = not table or table <= 0
            # 8-bit tables are symmetric: per channel (bf16 scales), or rtn's Q8_0 grid in groups (fp16
            # scales); gptq's grouped 8-bit head has float32 scales; a 4-bit one shares the decoder's zeros
            if ebits == 8 and not per_channel and head_method != "rtn":
                table_scale = 2 if fp16_scales else 4
            elif ebits == 8:
                table_scale = 2
            else:
                table_scale = kernel_scale_bytes(ebits, per_channel, sym, fp16_scales)
            total += kernel_linear_bytes(*p.shape, ebits, table, table_scale)
        else:
            total += p.numel * rest
    return total
