"""Exact bytes of what the inference engine allocates: weights in each format and the KV cache.

These are pure functions of the config; the engine imports them to size its allocations, so the plan and
the allocation cannot drift apart.

Weights (`weight_bytes`):
  - fp32 / bf16 / fp16: parameters x 4 / 2 / 2 bytes.
  - w8 / w4 (slimlm's own format, group size g along the input dimension): every projection of every
    decoder layer (q, k, v, o, gate, up, down) is stored as packed integers, 1 byte (w8) or 0.5 byte (w4,
    two values a byte, rows padded to whole bytes) per weight, plus one scale and one zero point per group
    per output channel, bf16 each (4 bytes per group per row; the int4 tinygemm layout). A row of `in`
    weights has ceil(in / g) groups. g <= 0 means per-channel: for w4 one group per row; for w8 the
    symmetric int8 kernel's layout, one bf16 scale per output channel and no zero point (2 bytes per row).
    Grouped w8 runs as nibble pairs on the int4 kernel where its shapes fit (quant/int8pair.py), which
    also keeps each group's exact scale as stored (float32; fp16 for rtn's Q8_0-grid table), a uint8
    zero point unless symmetric, and 4 bytes of input multipliers per weight.
    The token embedding and lm_head are quantized when `quantize_embeddings` is True (None: as
    `slimlm quantize --embeddings auto`, always): a 4-bit table at the decoder's group size, an 8-bit one
    in groups of `embedding_group_size` (default: formats.weights.table_group_size: 32 in an all-8-bit
    model, per-channel beside 4-bit weights); a tied lm_head is the embedding's table and is counted once.
    With False (--embeddings float, and checkpoints made before embeddings were
    quantized) they stay in the model dtype. Norms and
    biases always stay in the model dtype (`dtype`).

KV cache (`kv_bytes_per_token`, `kv_block_bytes`), per token:
  2 (K and V) x layers x kv_heads x head_dim x bytes per element (fp32 4, bf16/fp16 2);
  int8: 2 x layers x kv_heads x (head_dim + 3): 1 byte per element plus, per token, per head, for K and for
  V, an fp16 scale and a uint8 zero point (asymmetric, LMDeploy's quant_policy=8; the layout of
  `slimlm.kv.quantized`);
  int4: layers x kv_heads x (2 x head_dim / 2 + 3 + 3 x head_dim / block_size): two elements a byte;
  values with a scale and zero per token and head, keys with one per channel per block (KIVI), and a
  4-byte staging index per block; plus a fixed bf16 staging area (`kv_staging_bytes`: per running
  sequence its attention-sink blocks, the first 32 tokens, and its unfinished blocks);
  k8v4: layers x kv_heads x (head_dim + 3 + head_dim / 2 + 3).
"""

from __future__ import annotations

from slimlm.config import ModelConfig
from slimlm.errors import SlimlmError
from slimlm.formats.dtypes import FLOAT_BYTES, float_dtype_name, kv_dtype_name
from slimlm.formats.weights import (
    WEIGHT_BITS,
    WEIGHT_FORMATS,
    linear_group_size,
    quantize_embeddings_for,
    quantized_linear_bytes,
    table_group_size,
    weight_format_name,
)
from slimlm.plan.shapes import model_params

__all__ = ["FLOAT_BYTES", "WEIGHT_FORMATS", "quantized_linear_bytes", "normalize_float_dtype",
           "normalize_weight_format", "normalize_kv_dtype", "weight_bytes", "kv_bytes_per_token",
           "kv_block_bytes", "kv_staging_bytes", "kv_bytes_per_head_token"]  # fmt: skip

# The formats' names and layouts live in slimlm.formats; the planner computes with them.
normalize_float_dtype = float_dtype_name
normalize_weight_format = weight_format_name


def weight_bytes(
    config: ModelConfig,
    weight_format: str = "bf16",
    group_size: int | None = 128,
    *,
    dtype: str = "bf16",
    quantize_embeddings: bool | None = None,
    embedding_bits: int | None = None,
    group_sizes: dict[str, int] | None = None,
    embedding_group_size: int | None = None,
    sym: bool | None = None,
    head_method: str = "rtn",
) -> int:
    """Bytes of all weights as the engine stores them (see the module docstring for the layout).

    `dtype` is the model dtype that unquantized tensors keep under w8/w4 (ignored for float formats).
    `embedding_bits` (default: the format's bits) and `group_sizes` (per-linear group sizes) as
    `slimlm quantize --embedding-bits / --group-sizes` write them into the checkpoint's config.
    `sym` (None: quantize's default, symmetric at 8 bits) and `head_method` matter for grouped 8-bit
    weights only: on the PyTorch path they run as nibble pairs (quant/int8pair.py), which also keep the
    exact scales (float32 as `quantize` stores a linear's; fp16 for rtn's Q8_0-grid table) and, when
    asymmetric, uint8 zero points.
    """
    from slimlm.quant.int8pair import pair_extra_bytes, pair_shape_fits

    sym8 = True if sym is None else sym
    fmt = normalize_weight_format(weight_format)
    if fmt in FLOAT_BYTES:
        return config.num_parameters() * FLOAT_BYTES[fmt]
    if group_size is not None and group_size > 0 and group_size % 2 and fmt == "w4":
        raise SlimlmError(f"w4 group size must be even, got {group_size}")
    rest = FLOAT_BYTES[normalize_float_dtype(dtype)]
    if quantize_embeddings is None:  # `slimlm quantize --embeddings auto`
        quantize_embeddings = quantize_embeddings_for("auto", WEIGHT_BITS[fmt])
    total = 0
    for p in model_params(config):
        if p.kind == "linear":
            name = p.name.removeprefix(f"model.layers.{p.layer}.").removesuffix(".weight")
            size = linear_group_size(group_sizes, p.layer, name, group_size)
            total += quantized_linear_bytes(*p.shape, WEIGHT_BITS[fmt], size)
            if WEIGHT_BITS[fmt] == 8 and pair_shape_fits(*p.shape, size):
                total += pair_extra_bytes(*p.shape, size, 4, sym8)
        elif p.kind in ("embedding", "lm_head") and quantize_embeddings:
            bits = embedding_bits or WEIGHT_BITS[fmt]
            table = table_group_size(WEIGHT_BITS[fmt], bits, group_size, embedding_group_size)
            total += quantized_linear_bytes(*p.shape, bits, table)
            if bits == 8 and pair_shape_fits(*p.shape, table):  # 8-bit tables are symmetric
                total += pair_extra_bytes(*p.shape, table, 2 if head_method == "rtn" else 4, True)
        else:
            total += p.numel * rest
    return total


def normalize_kv_dtype(name: str) -> str:
    """A stored KV dtype (not "auto": the planner resolves it to the compute dtype first)."""
    return kv_dtype_name(name, allow_auto=False)


def kv_bytes_per_head_token(head_dim: int, kv_dtype: str, block_size: int = 16) -> float:
    """Bytes of one K and one V vector of one head for one token, scales and zeros included
    (the quantized formats' table, slimlm/formats/kv.py, which the pools read too). int4 keys have
    a scale per channel per block, so its figure is a block's bytes / block_size."""
    from slimlm.formats.kv import KV_FORMATS

    kind = normalize_kv_dtype(kv_dtype)
    if kind in FLOAT_BYTES:
        return 2 * head_dim * FLOAT_BYTES[kind]
    return KV_FORMATS[kind].bytes_per_token_head(head_dim, block_size)


def kv_bytes_per_token(config: ModelConfig, kv_dtype: str, block_size: int = 16) -> float:
    """layers x kv_heads x bytes of K and V per head (GQA-aware: kv_heads, not attention heads)."""
    return kv_block_bytes(config, kv_dtype, block_size) / block_size


def kv_block_bytes(config: ModelConfig, kv_dtype: str, block_size: int) -> int:
    """Exact bytes of one paged-KV block of `block_size` tokens across all layers, K and V."""
    from slimlm.formats.kv import KV_FORMATS

    if block_size <= 0:
        raise SlimlmError(f"block_size must be positive, got {block_size}")
    kind = normalize_kv_dtype(kv_dtype)
    if kind in FLOAT_BYTES:
        return (
            block_size
            * 2
            * config.num_hidden_layers
            * config.num_key_value_heads
            * config.head_dim
            * FLOAT_BYTES[kind]
        )
    return KV_FORMATS[kind].block_bytes(config, block_size)


def kv_staging_bytes(config: ModelConfig, kv_dtype: str, block_size: int, max_num_seqs: int) -> int:
    """The int4 pool's bf16 staging slots (slimlm/kv/kivi.py): (2 + sink blocks) x max_num_seqs + 1 blocks
    (each sequence's attention-sink blocks and unfinished blocks)."""
    from slimlm.formats.kv import KV_FORMATS

    kind = normalize_kv_dtype(kv_dtype)
    if kind in FLOAT_BYTES or not KV_FORMATS[kind].key_channels:
        return 0
    per_slot = 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * 2
    return KV_FORMATS[kind].staging_slots(max_num_seqs, block_size) * per_slot
