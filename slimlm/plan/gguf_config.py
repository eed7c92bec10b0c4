"""GGUF metadata -> the sizes the planner needs, for any decoder architecture llama.cpp writes.

Reads only the header (metadata and tensor directory) with the parser the loader uses
(`slimlm.tokenizer.gguf_metadata.parse_gguf_header`). The config is built here, not by the loader's
`config_from_gguf`: the loader refuses architectures and RoPE variants slimlm cannot run, while planning
only needs sizes.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.config import ModelConfig
from slimlm.errors import SlimlmError
from slimlm.formats.families import GGUF_ARCHITECTURES
from slimlm.tokenizer.gguf_metadata import parse_gguf_header


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]  # string and long arrays are replaced by their length (all the planner needs)
    tensors: dict[str, tuple[tuple[int, ...], int]]  # name -> (shape, fastest dim first; ggml type id)


@dataclass
class GGUFInfo:
    config: ModelConfig
    architecture: str
    file_bytes: int
    tensor_types: dict[str, int]  # GGML type name -> number of tensors


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor directory through the loader's header parser, over a memory map."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with memoryview(mapped) as view:
                meta, directory, _ = parse_gguf_header(view, str(path))
    except (OSError, ValueError) as e:
        raise SlimlmError(f"{path} is not a readable GGUF file ({e}); re-download or re-convert it") from None
    metadata = {k: len(v) if _summarized(v) else v for k, v in meta.items()}
    return GGUFHeader(metadata, {name: (shape, type_id) for name, shape, type_id, _ in directory})


def _summarized(value: Any) -> bool:
    """Tokenizer arrays (strings, or long score/type lists): the planner keeps only their length."""
    return isinstance(value, list) and (len(value) > 4096 or (bool(value) and isinstance(value[0], str)))


def _type_name(type_id: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return f"type{type_id}"


def read_gguf_config(path: str | Path) -> GGUFInfo:
    path = Path(path)
    header = read_gguf_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not arch:
        raise SlimlmError(f"{path} has no general.architecture in its GGUF metadata; the file is incomplete")

    def need(key: str):
        if f"{arch}.{key}" not in meta:
            raise SlimlmError(f"GGUF metadata of {path.name} is missing {arch}.{key}; the file is incomplete")
        return meta[f"{arch}.{key}"]

    heads, hidden = int(need("attention.head_count")), int(need("embedding_length"))
    vocab = meta.get("tokenizer.ggml.tokens") or meta.get(f"{arch}.vocab_size")
    if not vocab and "token_embd.weight" in header.tensors:
        vocab = header.tensors["token_embd.weight"][0][-1]
    config = _runnable_config(meta, header, int(vocab or 0)) or ModelConfig(
        family=GGUF_ARCHITECTURES.get(arch, "llama"),  # other families are planned by their sizes
        vocab_size=int(vocab or 0),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in header.tensors,
        attention_bias="blk.0.attn_q.bias" in header.tensors,
        sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        torch_dtype="float32",
    )
    types: dict[str, int] = {}
    for _shape, type_id in header.tensors.values():
        name = _type_name(type_id)
        types[name] = types.get(name, 0) + 1
    return GGUFInfo(config, arch, path.stat().st_size, types)


def _runnable_config(meta: dict[str, Any], header: GGUFHeader, vocab: int) -> ModelConfig | None:
    """The loader's own config for files slimlm runs (exact parameter counts: q/k norms, Gemma's four
    norms), or None where the loader would refuse the file and only the sizes get planned."""
    from slimlm.loading.gguf_file import config_from_gguf

    if meta.get("general.architecture") not in GGUF_ARCHITECTURES:
        return None
    try:
        return config_from_gguf(meta, set(header.tensors), vocab or None)
    except SlimlmError:
        return None
