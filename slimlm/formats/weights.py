"""Weight formats: their names, the bytes of a quantized linear layer, and whether `slimlm quantize`
quantizes the token embedding and lm_head (one rule for the quantizer and the planner; torch-free, so
`slimlm plan` stays light).

auto quantizes them at both widths. At 4 bits that is what takes w4 under a third of bf16. At 8 bits the
table was kept float while it was per-channel int8 (SmolLM2-135M w8: +0.55% vs +0.22% decoder only); in
groups of 32 on llama.cpp's Q8_0 grid (`table_group_size`, rtn.group_qparams `narrow`) it costs about
nothing measurable on that model and is a third of the bytes a decoding step reads (docs/quantization.md).
"""

from __future__ import annotations

from slimlm.errors import SlimlmError
from slimlm.formats.dtypes import DTYPE_ALIASES

WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "w8", "w4")
WEIGHT_BITS = {"w8": 8, "w4": 4}
GROUP_SCALE_ZERO_BYTES = 4  # bf16 scale + bf16 zero point per group per output channel
INT8_CHANNEL_SCALE_BYTES = 2  # per-channel symmetric int8: one bf16 scale per output channel

EMBEDDING_MODES = ("auto", "quantize", "float")
W8_TABLE_GROUP = 32  # the 8-bit default's table: llama.cpp's Q8_0 blocks (docs/quantization.md)


def quantize_embeddings_for(mode: str | bool | None, bits: int) -> bool:
    """Resolve an --embeddings mode (or an explicit bool; None = auto) for `bits`-bit weights."""
    if isinstance(mode, bool):
        return mode
    mode = "auto" if mode is None else mode
    if mode not in EMBEDDING_MODES:
        raise SlimlmError(f"unknown embeddings mode {mode!r}: use one of {', '.join(EMBEDDING_MODES)}")
    return True if mode == "auto" else mode == "quantize"


def table_group_size(
    bits: int, embedding_bits: int, group_size: int | None, requested: int | None = None, legacy: bool = False
) -> int | None:
    """The quantized embedding/lm_head table's group size (-1: per channel): `requested`
    (`quantize --embedding-group-size`) if given; a 4-bit table takes the decoder's `group_size`; an
    8-bit table is per-channel beside 4-bit decoder weights and in groups of 32 in an all-8-bit model.
    `legacy`: the rule before the table had a group size of its own (8 bits: always per-channel), for
    checkpoints whose config does not name one."""
    if requested is not None and not legacy:
        return requested
    if embedding_bits == 4:
        return group_size
    return -1 if legacy or bits != 8 else W8_TABLE_GROUP


def weight_format_name(name: str) -> str:
    """'bfloat16' -> 'bf16', 'int4' -> 'w4'; one of WEIGHT_FORMATS or one clear error."""
    key = str(name).removeprefix("torch.").lower()
    key = {**DTYPE_ALIASES, "int8": "w8", "int4": "w4"}.get(key, key) if key != "float" else key
    if key not in WEIGHT_FORMATS:
        raise SlimlmError(f"unknown weight format {name!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    return key


def quantized_linear_bytes(out_features: int, in_features: int, bits: int, group_size: int | None) -> int:
    """Packed integer weights + a scale and a zero point per group per output channel."""
    if bits not in (4, 8):
        raise SlimlmError(f"quantized weights have 8 or 4 bits, got {bits}")
    packed_row = -(-in_features * bits // 8)
    if not group_size or group_size <= 0:
        per_row = INT8_CHANNEL_SCALE_BYTES if bits == 8 else GROUP_SCALE_ZERO_BYTES
        return out_features * (packed_row + per_row)
    groups_per_row = -(-in_features // group_size)
    return out_features * (packed_row + groups_per_row * GROUP_SCALE_ZERO_BYTES)


def linear_group_size(
    group_sizes: dict[str, int] | None, layer: int, name: str, default: int | None
) -> int | None:
    """A decoder linear's group size under per-linear sizes (`quantize --group-sizes`): "3.mlp.down_proj"
    (one layer) before "mlp.down_proj" (every layer) before the checkpoint's `default`."""
    if not group_sizes:
        return default
    return group_sizes.get(f"{layer}.{name}", group_sizes.get(name, default))
