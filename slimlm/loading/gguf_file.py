"""GGUF reader: metadata -> ModelConfig, tensors dequantized one at a time into the target dtype."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimlm.config import GGUF_ARCHITECTURES, ModelConfig, RopeScaling
from slimlm.errors import SlimlmError

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


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/IndexError on bad bytes
        raise SlimlmError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); re-download or re-convert it") from None


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


def gguf_metadata(reader, skip_tokenizer_arrays: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if skip_tokenizer_arrays and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                              "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        out[key] = field_value(field)
    return out


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], vocab_size: int | None = None) -> ModelConfig:
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
        raise SlimlmError("GGUF files with Llama-3.1 rope_freqs tensors are not supported yet; use the HF checkpoint")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in (eos, eot) if i is not None]
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
    )


def hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        mapped = _LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{mapped}.{suffix}" if mapped else None
    mapped = _TOP_NAMES.get(base)
    return f"{mapped}.{suffix}" if mapped else None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF's rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_numpy(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    qtype = tensor.tensor_type
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = np.asarray(tensor.data)
    else:
        try:
            arr = quants.dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise SlimlmError(f"GGUF tensor {tensor.name} uses {qtype.name}, which the gguf package cannot dequantize") from None
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists the fastest dim first
    return arr.reshape(shape)


def iter_gguf_tensors(reader, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (hf_name, float array) one tensor at a time; never holds more than one dequantized."""
    unpermute = config.family != "qwen2"  # llama.cpp permutes Q/K for llama-arch files only
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        try:
            arr = _to_numpy(tensor)
        except (ValueError, IndexError) as e:
            raise SlimlmError(f"GGUF tensor {tensor.name} is corrupt or truncated ({e}); re-download the file") from None
        if unpermute and name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = _unpermute(arr, config.num_attention_heads)
        elif unpermute and name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = _unpermute(arr, config.num_key_value_heads)
        yield name, arr


def tensor_to_torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Wrap without copying; F32/F16 arrays are read-only views of the mmap, which we only read from."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
