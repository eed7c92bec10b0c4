"""Quantized checkpoints: slimlm's own layout, and the AutoAWQ (GEMM) and GPTQ layouts users already have.

slimlm layout (quant_method "slimlm"), per quantized linear `P` (and for model.embed_tokens, whose
table a tied lm_head shares: then no lm_head.* is written; see embedding.py):
    P.qweight  uint8 [out, in/2] for 4 bits (two codes a byte, even column in the low nibble),
               uint8 [out, in] for 8 bits
    P.scales   float [out, groups]         P.zeros  uint8 (int16 if a zero exceeds 255) [out, groups],
                                           or float32 for float zero points (quantize --zero float)
    P.perm     int64 [in], act-order only  P.bias   float [out], if the layer has one
    model.embed_tokens.lookup_scale  float [in], AWQ on a tied head only: lookups divide rows by it
  with W[:, perm] = (q - z) * s group-wise (see scheme.py). Everything else is a plain float tensor.

AutoAWQ GEMM (quant_method "awq", version "gemm"), 4 bits only:
    qweight int32 [in, out/8]: word (i, c) holds W[8c + AWQ_ORDER[j], i]'s code in bits 4j..4j+3
    qzeros  int32 [groups, out/8], same interleaving; scales fp16 [groups, out]; W = (q - z) * s.
GPTQ (quant_method "gptq"):
    qweight int32 [in·bits/32, out]: word (r, o) holds the codes of inputs r·k .. r·k+k-1 (k = 32/bits),
            lowest bits first; qzeros int32 [groups, out·bits/32] packed the same way along out;
    scales fp16 [groups, out]; g_idx int32 [in] (group of each input column, act-order permutes it).
    checkpoint_format "gptq" (v1, the default) stores z - 1, "gptq_v2" stores z.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quant.linear import QuantLinear, make_quant_linear, portable_zeros, storage_zeros
from slimlm.quant.scheme import QuantizedWeight, pack_nibbles, perm_from_g_idx, unpack_nibbles

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column AWQ_ORDER[j] of its 8
QUANT_METHODS = ("slimlm", "awq", "gptq")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in slimlm's layout (parameters only; tied tensors kept under their first name).

    A quantized embedding is written like a quantized linear under its own name (model.embed_tokens.*);
    a lm_head tied to it is that same table and is not written again.
    """
    from slimlm.quant.embedding import QuantEmbedding

    state: dict[str, torch.Tensor] = {}
    quant_prefixes, written = [], set()
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            quant_prefixes.append(name + ".")
            written.add(id(module.table))
            _write_quantized(state, name, module.table, module.quantized_table())
            if module.lookup_scale is not None:  # AWQ on a tied head, see quant/head.py
                state[f"{name}.lookup_scale"] = module.lookup_scale.detach().float()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quant_prefixes.append(name + ".")
            if id(module) not in written:
                written.add(id(module))
                _write_quantized(state, name, module)
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith(tuple(quant_prefixes)) or param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        state[name] = param.detach()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def _write_quantized(state: dict[str, torch.Tensor], name: str, module: QuantLinear, qweight=None) -> None:
    qweight = module.quantized_weight() if qweight is None else qweight
    state[f"{name}.qweight"] = pack_nibbles(qweight.codes) if qweight.bits == 4 else qweight.codes
    state[f"{name}.scales"] = qweight.scales
    state[f"{name}.zeros"] = storage_zeros(qweight.zeros)
    if qweight.perm is not None:
        state[f"{name}.perm"] = qweight.perm.to(torch.int64)
    if module.bias is not None:
        state[f"{name}.bias"] = module.bias.detach()


def save_quantized(
    model: nn.Module, quant_config: dict, out_dir: str | Path, model_config: dict | None = None
) -> Path:
    """Write `model.safetensors` and `config.json` (with a "quantization_config" section) to `out_dir`.

    `model_config` defaults to the model's own config (`to_hf_dict()` for slimlm models, `to_dict()` for
    HF ones). Refuses to overwrite existing files, so a checkpoint can never replace its source.
    """
    out_dir = Path(out_dir)
    for file in (WEIGHTS_FILE, CONFIG_FILE):
        if (out_dir / file).exists():
            raise SlimlmError(f"{out_dir / file} already exists: choose an empty output directory")
    if model_config is None:
        config = getattr(model, "config", None)
        to_dict = getattr(config, "to_hf_dict", None) or getattr(config, "to_dict", None)
        model_config = to_dict() if to_dict else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(quantized_state_dict(model), out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {**model_config, "quantization_config": quant_config}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return out_dir


def load_quantized_state(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    quant_config: dict,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Swap a QuantLinear into `model` for every quantized linear of a slimlm/AutoAWQ/GPTQ checkpoint.

    `model` is the float skeleton (any device; meta works if `device` is given). Returns the entries of
    `state_dict` that are not quantized linears (embeddings, norms, lm_head) for the caller to load.
    """
    entries = quantized_entries(model, state_dict, quant_config)
    for entry in entries:
        if entry.is_embedding:
            _load_embedding(model, entry, device)
            continue
        linear = entry.module
        qweight = entry.read()
        target = _target_device(device, linear.weight)
        bias = entry.tensors.get("bias")
        if bias is not None:
            bias = bias.to(target, linear.weight.dtype if linear.weight.is_floating_point() else None)
        parent_name, _, child = entry.prefix.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make_quant_linear(qweight.map_tensors(lambda t, d=target: t.to(d)), bias))
    return rest_of_state(state_dict, entries)


@dataclass
class QuantEntry:
    """One quantized module of a checkpoint: its tensors (memory-mapped views) and the skeleton's module.
    `read()` unpacks them into a QuantizedWeight, checked against the module's shape; `read(rows)` only
    those output rows (slimlm's layout: rows are stored whole), so a vocab-sized table can be converted
    a few thousand rows at a time."""

    prefix: str
    module: nn.Module
    tensors: dict[str, torch.Tensor]
    method: str
    quant_config: dict

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.module, nn.Embedding)

    @property
    def shape(self) -> tuple[int, int]:
        m = self.module
        return (m.num_embeddings, m.embedding_dim) if self.is_embedding else (m.out_features, m.in_features)

    def read(self, rows: slice | None = None) -> QuantizedWeight:
        tensors = self.tensors
        if rows is not None:
            if self.method != "slimlm":
                raise ValueError("row slices are read from slimlm's layout only")
            tensors = {k: v[rows] if k in ("qweight", "scales", "zeros") else v for k, v in tensors.items()}
        qweight = _READERS[self.method](tensors, self.quant_config, self.prefix)
        out, k = self.shape
        expected = (out if rows is None else len(range(out)[rows]), k)
        _check_shape(self.prefix, "table" if self.is_embedding else "weight", qweight, expected)
        return qweight


def quantized_entries(
    model: nn.Module, state_dict: dict[str, torch.Tensor], quant_config: dict
) -> list[QuantEntry]:
    """The checkpoint's quantized modules, checked against the skeleton `model` (nothing unpacked yet)."""
    from slimlm.quant.embedding import EMBED_PATH

    method = str(quant_config.get("quant_method", "")).lower()
    if method not in QUANT_METHODS:
        raise SlimlmError(
            f"unsupported quantization method {method!r} in the checkpoint config: slimlm loads "
            "slimlm, awq (GEMM) and gptq checkpoints"
        )
    prefixes = sorted(k.removesuffix(".qweight") for k in state_dict if k.endswith(".qweight"))
    if not prefixes:
        raise SlimlmError("the checkpoint config says it is quantized but no tensor ends in .qweight")
    entries = []
    for prefix in prefixes:
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            raise SlimlmError(f"the checkpoint quantizes {prefix}, which this model does not have") from None
        if isinstance(module, nn.Embedding) and method == "slimlm":
            if prefix != EMBED_PATH:
                raise SlimlmError(
                    f"the checkpoint quantizes the embedding {prefix}; slimlm expects {EMBED_PATH}"
                )
        elif not isinstance(module, nn.Linear):
            raise SlimlmError(f"the checkpoint quantizes {prefix}, which is not a linear layer in this model")
        entries.append(QuantEntry(prefix, module, _tensors_under(state_dict, prefix), method, quant_config))
    return entries


def rest_of_state(state_dict: dict[str, torch.Tensor], entries: list[QuantEntry]) -> dict[str, torch.Tensor]:
    """The entries of `state_dict` that no quantized module consumed (norms, float embeddings, lm_head)."""
    consumed = {e.prefix + "." + k for e in entries for k in e.tensors}
    return {k: v for k, v in state_dict.items() if k not in consumed}


def _tensors_under(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of one module, keyed by their name inside it."""
    return {k.removeprefix(prefix + "."): v for k, v in state_dict.items() if k.startswith(prefix + ".")}


def _check_shape(prefix: str, what: str, qweight: QuantizedWeight, expected: tuple[int, int]) -> None:
    if (qweight.out_features, qweight.in_features) != expected:
        raise SlimlmError(
            f"{prefix}: checkpoint {what} is {qweight.out_features}x{qweight.in_features}, "
            f"the model expects {expected[0]}x{expected[1]}"
        )


def _target_device(device, weight: torch.Tensor) -> torch.device:
    """Where a loaded module goes: `device` if given, else where the skeleton's weight is (meta -> cpu)."""
    target = torch.device(device) if device is not None else weight.device
    return torch.device("cpu") if target.type == "meta" else target


def _load_embedding(model, entry: QuantEntry, device) -> None:
    from slimlm.quant.embedding import install_embedding

    embed, tensors = entry.module, entry.tensors
    qweight = entry.read()
    target = _target_device(device, embed.weight)
    bias = tensors.get("bias")
    bias = None if bias is None else bias.to(target, embed.weight.dtype)
    scale = tensors.get("lookup_scale")
    scale = None if scale is None else scale.to(target, torch.float32)
    install_embedding(model, qweight.map_tensors(lambda t: t.to(target)), embed.weight.dtype, bias, scale)


def unpack_awq_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> QuantizedWeight:
    """AutoAWQ GEMM int32 tensors -> QuantizedWeight (4 bits)."""
    codes = _awq_columns(qweight).T.contiguous()  # [out, in]
    zeros = _awq_columns(qzeros).T.contiguous()  # [out, groups]
    return QuantizedWeight(codes.to(torch.uint8), scales.T.contiguous(), zeros.to(torch.int32), 4, group_size)


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    zero_offset: int = 1,
) -> QuantizedWeight:
    """GPTQ int32 tensors -> QuantizedWeight; `zero_offset` is 1 for the v1 format, 0 for gptq_v2."""
    codes = _unpack_along(qweight, bits, dim=0).T.contiguous()  # [out, in], original column order
    zeros = (_unpack_along(qzeros, bits, dim=1) + zero_offset).T.contiguous()  # [out, groups]
    n_in = codes.shape[1]
    group_size = n_in if group_size == -1 else group_size
    perm = None if g_idx is None else perm_from_g_idx(g_idx, group_size)
    if perm is not None:
        codes = codes[:, perm]  # groups contiguous in the permuted order
    return QuantizedWeight(
        codes.to(torch.uint8), scales.T.contiguous(), zeros.to(torch.int32), bits, group_size, perm
    )


def _awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols/8] int32 -> [rows, cols] codes, undoing AutoAWQ's interleaved nibble order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [rows, cols/8, 8] in storage order
    columns = torch.empty_like(nibbles)
    columns[..., list(AWQ_ORDER)] = nibbles
    return columns.reshape(packed.shape[0], -1)


def _unpack_along(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Sequentially packed int32 -> codes, expanding `dim` by 32/bits (lowest bits = first element)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    if dim == 0:  # [rows, cols] -> [rows, per_word, cols] -> [rows*per_word, cols]
        values = (packed.to(torch.int32).unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)
        return values.reshape(packed.shape[0] * per_word, packed.shape[1])
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)  # [rows, cols, per_word]
    return values.reshape(packed.shape[0], packed.shape[1] * per_word)


def _need(tensors: dict[str, torch.Tensor], names: tuple[str, ...], prefix: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SlimlmError(
            f"{prefix} lacks {', '.join(missing)}: the checkpoint is incomplete or not this layout"
        )
    return [tensors[n] for n in names]


def _bits_and_group(
    quant_config: dict, bits_key: str = "bits", group_key: str = "group_size"
) -> tuple[int, int]:
    bits = int(quant_config.get(bits_key, quant_config.get("w_bit", 4)))
    group_size = int(quant_config.get(group_key, quant_config.get("q_group_size", 128)))
    if bits not in (4, 8):
        raise SlimlmError(
            f"the checkpoint uses {bits}-bit weights: slimlm runs 4- and 8-bit checkpoints only"
        )
    return bits, group_size


def _read_slimlm(tensors: dict[str, torch.Tensor], quant_config: dict, prefix: str) -> QuantizedWeight:
    qweight, scales, zeros = _need(tensors, ("qweight", "scales", "zeros"), prefix)
    bits = int(quant_config.get("bits", 0))
    if prefix in ("model.embed_tokens", "lm_head"):  # the table may have its own bits (--embedding-bits)
        bits = int(quant_config.get("embedding_bits", bits))
    if bits not in (4, 8):
        raise SlimlmError(f"slimlm checkpoint config has bits={bits}; expected 4 or 8")
    codes = unpack_nibbles(qweight) if bits == 4 else qweight
    n_in = codes.shape[1]
    if n_in % scales.shape[1]:
        raise SlimlmError(f"{prefix}: {scales.shape[1]} groups do not divide {n_in} input features")
    perm = tensors.get("perm")
    return QuantizedWeight(codes, scales, portable_zeros(zeros), bits, n_in // scales.shape[1],
                           None if perm is None else perm.to(torch.int64))  # fmt: skip


def _read_awq(tensors: dict[str, torch.Tensor], quant_config: dict, prefix: str) -> QuantizedWeight:
    version = str(quant_config.get("version", "gemm")).lower()
    if version != "gemm":
        raise SlimlmError(
            f"AWQ checkpoints of version {version!r} are not supported: slimlm loads the GEMM layout"
        )
    bits, group_size = _bits_and_group(quant_config)
    if bits != 4:
        raise SlimlmError(f"AWQ GEMM checkpoints are 4-bit; this config says {bits}")
    qweight, qzeros, scales = _need(tensors, ("qweight", "qzeros", "scales"), prefix)
    group_size = qweight.shape[0] if group_size == -1 else group_size
    return unpack_awq_gemm(qweight, qzeros, scales, group_size)


def _read_gptq(tensors: dict[str, torch.Tensor], quant_config: dict, prefix: str) -> QuantizedWeight:
    bits, group_size = _bits_and_group(quant_config)
    qweight, qzeros, scales = _need(tensors, ("qweight", "qzeros", "scales"), prefix)
    checkpoint_format = str(quant_config.get("checkpoint_format", "gptq")).lower()
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise SlimlmError(
            f"GPTQ checkpoint_format {checkpoint_format!r} is not supported: use gptq or gptq_v2"
        )
    zero_offset = 1 if checkpoint_format == "gptq" else 0
    return unpack_gptq(qweight, qzeros, scales, tensors.get("g_idx"), bits, group_size, zero_offset)


_READERS = {"slimlm": _read_slimlm, "awq": _read_awq, "gptq": _read_gptq}
