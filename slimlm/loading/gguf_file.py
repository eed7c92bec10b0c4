"""GGUF files: metadata -> ModelConfig, tensors dequantized block by block straight into the model's storage."""

from __future__ import annotations

import math
import mmap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimlm.config import FULL, SLIDING, ModelConfig, RopeScaling
from slimlm.errors import SlimlmError
from slimlm.formats.families import GGUF_ARCHITECTURES

# GGUF tensor name (after "blk.N.") -> HF parameter name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Per family, where llama.cpp's names differ from the Llama layout above (q/k norms; Gemma's four norms).
_FAMILY_LAYER_NAMES = {
    "qwen3": {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "gemma3": {
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}


def field_value(field) -> Any:
    """Decode one GGUFReader field into a plain Python value (str, number, or list)."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


def config_from_gguf(
    meta: dict[str, Any], tensor_names: set[str], vocab_size: int | None = None
) -> ModelConfig:
    arch = meta.get("general.architecture")
    family = GGUF_ARCHITECTURES.get(arch or "")
    if family is None:
        raise SlimlmError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise SlimlmError(f"GGUF metadata is missing required key {full!r}; the file is incomplete")
            return default
        return meta[full]

    n_heads = get("attention.head_count", required=True)
    hidden = get("embedding_length", required=True)
    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none", "linear"):
        raise SlimlmError(f"GGUF RoPE scaling {scaling_type!r} is not supported; supported: linear")
    if scaling_type == "linear":
        rope_scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor", 1.0)))
    if "rope_freqs.weight" in tensor_names:
        raise SlimlmError(
            "GGUF files with Llama-3.1 rope_freqs tensors are not supported yet; use the HF checkpoint"
        )
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in (eos, eot) if i is not None]
    extra = {}
    if family == "qwen3":
        extra = {"qk_norm": True}
    elif family == "gemma3":
        extra = _gemma3_fields(meta, get, hidden, n_heads)
        tokens = meta.get("tokenizer.ggml.tokens")
        if (
            isinstance(tokens, list) and "<end_of_turn>" in tokens
        ):  # chat turns end there (HF's generation_config stops there too)
            eos_ids.append(tokens.index("<end_of_turn>"))
    return ModelConfig(
        family=family,
        vocab_size=vocab_size or get("vocab_size") or 0,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length", required=True),
        num_hidden_layers=get("block_count", required=True),
        num_attention_heads=n_heads,
        num_key_value_heads=get("attention.head_count_kv", n_heads),
        head_dim=get("attention.key_length", get("rope.dimension_count", hidden // n_heads)),
        max_position_embeddings=get("context_length", 4096),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        sliding_window=get("attention.sliding_window"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        torch_dtype="float32",
        **extra,
    )


def _gemma3_fields(meta: dict[str, Any], get, hidden: int, n_heads: int) -> dict[str, Any]:
    """What llama.cpp's gemma3 graph fixes in code rather than in the file: every sixth layer global,
    local RoPE base 10000, GeGLU; the attention scale is 1/sqrt(head_dim) except the 27B model's
    (62 layers), which uses 1/sqrt(hidden / heads)."""
    layers = get("block_count", required=True)
    head_dim = get("attention.key_length", hidden // n_heads)
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "qk_norm": True,
        "layer_types": [SLIDING if (i + 1) % 6 else FULL for i in range(layers)],
        "rope_local_theta": 10000.0,
        "query_pre_attn_scalar": float(hidden // n_heads if layers == 62 else head_dim),
        "final_logit_softcapping": get("final_logit_softcapping"),
    }


def hf_name(gguf_name: str, family: str = "llama") -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        mapped = _FAMILY_LAYER_NAMES.get(family, {}).get(part) or _LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{mapped}.{suffix}" if mapped else None
    mapped = _TOP_NAMES.get(base)
    return f"{mapped}.{suffix}" if mapped else None


class GGUFFile:
    """A memory-mapped GGUF file: metadata (a plain dict), the tensor directory, tensor bytes on demand.

    Parsed with slimlm's own header reader (`parse_gguf_header`): `gguf.GGUFReader` builds a numpy view
    per tokenizer string (~250k small objects, ~150 MiB, seconds for a 49k-token vocabulary) and holds
    them as long as the reader lives. Use as a context manager; `drop_metadata()` frees the tokenizer
    arrays once the config and tokenizer are built.
    """

    def __init__(self, path: Path) -> None:
        from gguf import GGML_QUANT_SIZES

        from slimlm.tokenizer.gguf_metadata import parse_gguf_header

        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise SlimlmError(
                f"{path} is not a readable GGUF file ({e}); re-download or re-convert it"
            ) from None
        try:
            with memoryview(self._map) as view:
                self.metadata, directory, data_start = parse_gguf_header(view, str(path))
            self.tensors: list[GGUFTensorInfo] = []
            for name, dims, type_id, offset in directory:
                if type_id not in GGML_QUANT_SIZES:
                    raise SlimlmError(f"GGUF tensor {name} has unknown ggml type {type_id}")
                block, type_size = GGML_QUANT_SIZES[type_id]
                if not dims or dims[0] % block:
                    raise SlimlmError(
                        f"GGUF tensor {name} has shape {dims}, not whole {block}-element blocks"
                    )
                shape = tuple(int(d) for d in reversed(dims))  # GGUF lists the fastest dim first
                start = data_start + offset
                nbytes = math.prod(shape) // block * type_size
                if start + nbytes > len(self._map):
                    raise SlimlmError(
                        f"the file is truncated: tensor {name} ends at byte {start + nbytes:,} of {len(self._map):,}"
                    )
                self.tensors.append(GGUFTensorInfo(name, shape, int(type_id), start, nbytes))
        except SlimlmError as e:
            self.close()
            detail = str(e).removeprefix(str(path)).lstrip(": ")
            raise SlimlmError(
                f"{path} is not a readable GGUF file ({detail}); re-download or re-convert it"
            ) from None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view of the bytes: the map goes with it
            pass

    def drop_metadata(self) -> None:
        """Forget the metadata (tokenizer vocabulary and merges: ~100k Python strings)."""
        self.metadata = {}

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes (read-only, no copy), one row (of the fastest dim) per row of the array."""
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.start)
        return data.reshape(math.prod(info.shape[:-1]), -1)

    def release(self, info: GGUFTensorInfo) -> None:
        """Drop the tensor's pages from this process's resident set (they stay in the page cache)."""
        if not hasattr(self._map, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = info.start - info.start % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, first, info.start + info.nbytes - first)


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str  # the GGUF name (blk.0.attn_q.weight)
    shape: tuple[int, ...]  # torch order: slowest dim first
    qtype: int  # ggml type id
    start: int  # byte offset of the data in the file
    nbytes: int


# Elements dequantized per step: 4 MiB of float32, plus the gguf package's temporaries (a few times that).
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class GGUFTensor:
    """One GGUF tensor, dequantized only when `copy_to` writes it into its destination.

    Dequantizes a block of rows at a time (about CHUNK_ELEMENTS) and copies each block straight into the
    destination tensor, converting to its dtype on the way: the extra memory is one block, never a full
    float32 copy of the tensor. Llama-arch Q/K weights are un-permuted by writing through a view.
    """

    file: GGUFFile
    info: GGUFTensorInfo
    unpermute_heads: int | None = None  # undo llama.cpp's Q/K row permutation for this many heads
    shift: float = 0.0  # added to every value (Gemma files store norm weights as 1 + w)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    def copy_to(self, dest: torch.Tensor) -> None:
        info, heads = self.info, self.unpermute_heads
        if tuple(dest.shape) != info.shape:
            raise SlimlmError(
                f"GGUF tensor {info.name} has shape {info.shape}, the destination {tuple(dest.shape)}"
            )
        target = dest
        if heads:
            if info.shape[0] % (2 * heads):
                raise SlimlmError(
                    f"GGUF tensor {info.name}: {info.shape[0]} rows do not split into {heads} heads"
                )
            target = _file_order_view(dest, heads)
        raw = self.file.raw(info)
        lead = target.shape[0]
        numel = math.prod(info.shape)
        if len(info.shape) == 1 or numel <= CHUNK_ELEMENTS:
            step, rows_per_lead = lead, None
        else:
            rows_per_lead = raw.shape[0] // lead
            step = max(1, CHUNK_ELEMENTS // (numel // lead))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", UserWarning)  # from_numpy of a read-only mmap view: we only read
            for i in range(0, lead, step):
                j = min(lead, i + step)
                part = raw if rows_per_lead is None else raw[i * rows_per_lead : j * rows_per_lead]
                values = _dequantize(part, info)
                if self.shift:
                    values = values + np.float32(self.shift)
                block = target[i:j]
                block.copy_(torch.from_numpy(values).view(block.shape))
        self.file.release(info)


def _file_order_view(dest: torch.Tensor, heads: int) -> torch.Tensor:
    """`dest` seen in llama.cpp's Q/K row order (interleaved RoPE pairs), so writing it un-permutes.

    Row h*2R + 2r + t of the file (head h, pair r, half t) is row h*2R + t*R + r of HF's rotate-half layout.
    """
    rows = dest.shape[0]
    return dest.view(heads, 2, rows // heads // 2, *dest.shape[1:]).transpose(1, 2)


def _dequantize(raw: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    from slimlm.loading.gguf_kquants import dequantize as dequantize_blocks

    qtype = GGMLQuantizationType(info.qtype)
    try:
        # slimlm's own numpy path for the legacy and k-quant types; the gguf package for the rest
        values = dequantize_blocks(raw, info.qtype)
        return values if values is not None else quants.dequantize(raw, qtype)
    except NotImplementedError:
        raise SlimlmError(
            f"GGUF tensor {info.name} uses ggml type {qtype.name}, which slimlm cannot dequantize; "
            "re-quantize the file to Q4_K, Q6_K or Q8_0 (llama-quantize)"
        ) from None
    except (ValueError, IndexError) as e:
        raise SlimlmError(
            f"GGUF tensor {info.name} is corrupt or truncated ({e}); re-download the file"
        ) from None


def gguf_weights(file: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, GGUFTensor]]:
    """(HF name, lazily dequantized tensor) for every tensor slimlm has a place for."""
    unpermute = config.family in ("llama", "mistral")  # llama.cpp permutes Q/K for llama-arch files only
    for info in file.tensors:
        name = hf_name(info.name, config.family)
        if name is None:
            continue
        if config.family == "gemma3" and name.endswith("norm.weight"):
            yield name, GGUFTensor(file, info, shift=-1.0)  # the converter stored 1 + w
            continue
        heads = None
        if unpermute and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = config.num_attention_heads
        elif unpermute and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = config.num_key_value_heads
        yield name, GGUFTensor(file, info, heads)


def config_and_tokenizer(file: GGUFFile):
    """(ModelConfig, Tokenizer) from an open GGUF file's metadata; the loaders and the Ray ingress share it."""
    from slimlm.tokenizer import Tokenizer

    meta = file.metadata
    vocab = len(meta.get("tokenizer.ggml.tokens") or []) or None
    return config_from_gguf(meta, {t.name for t in file.tensors}, vocab), Tokenizer.from_gguf(meta)
