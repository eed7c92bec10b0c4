"""GGUF metadata -> the sizes the planner needs, for any decoder architecture llama.cpp writes.

Reads only the header (metadata and tensor directory) with a small parser of the GGUF v2/v3 layout:
`gguf.GGUFReader` builds numpy views of every tokenizer entry and takes seconds on a 49k-token
vocabulary, the header walk takes milliseconds. Kept apart from `slimlm.loading.gguf_file` on purpose
for now: the loader refuses architectures and RoPE variants slimlm cannot run, while planning only needs
sizes. TODO(dedupe): move the header reader into `slimlm.loading` once the loader wants it too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from slimlm.config import GGUF_ARCHITECTURES, ModelConfig
from slimlm.errors import SlimlmError

# GGUF value types: id -> struct format of a scalar (8 = string, 9 = array are read apart).
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]  # string arrays are replaced by their length (the planner needs only that)
    tensors: dict[
        str, tuple[tuple[int, ...], int]
    ]  # name -> (shape, fastest dim first as GGUF lists it; ggml type id)


@dataclass
class GGUFInfo:
    config: ModelConfig
    architecture: str
    file_bytes: int
    tensor_types: dict[str, int]  # GGML type name -> number of tensors


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        data = self.f.read(n)
        if len(data) != n:
            raise EOFError
        return data.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype == _STRING:  # tokenizer vocabularies and merges: skip, keep the length
                for _ in range(count):
                    self.f.seek(self.unpack("<Q"), 1)
                return count
            if etype in _SCALARS and count > 4096:
                self.f.seek(struct.calcsize(_SCALARS[etype]) * count, 1)
                return count
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            r = _Reader(f)
            if f.read(4) != b"GGUF":
                raise SlimlmError(f"{path} is not a GGUF file (no GGUF magic bytes)")
            version = r.unpack("<I")
            if version < 2:
                raise SlimlmError(f"{path} is GGUF version {version}; re-convert it with a current llama.cpp")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            metadata = {}
            for _ in range(n_kv):
                key = r.string()
                metadata[key] = r.value(r.unpack("<I"))
            tensors = {}
            for _ in range(n_tensors):
                name = r.string()
                shape = tuple(r.unpack("<Q") for _ in range(r.unpack("<I")))
                tensors[name] = (shape, r.unpack("<I"))
                r.unpack("<Q")  # data offset
    except (EOFError, ValueError, struct.error) as e:
        raise SlimlmError(
            f"{path} is not a readable GGUF file ({e or 'truncated'}); re-download or re-convert it"
        ) from None
    return GGUFHeader(metadata, tensors)


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
    config = ModelConfig(
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
