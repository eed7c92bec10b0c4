"""GGUF metadata as a plain dict: from a `gguf.GGUFReader`, or read directly (fast; the tensor directory too)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from slimlm.errors import SlimlmError

# GGUF value type -> (struct format, numpy dtype) for fixed-size scalars; 8 = string, 9 = array
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


def gguf_fields(reader: Any) -> dict[str, Any]:
    """A `gguf.GGUFReader`'s metadata as a plain dict: strings decoded, arrays as lists, scalars as Python values."""
    import gguf

    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        types = field.types
        if not types:
            continue
        if types[0] == gguf.GGUFValueType.ARRAY:
            if len(types) > 2:
                continue  # arrays of arrays: no tokenizer key uses them
            if types[-1] == gguf.GGUFValueType.STRING:
                out[key] = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
            else:
                out[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif types[0] == gguf.GGUFValueType.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        else:
            out[key] = field.parts[field.data[0]].tolist()[0]
    return out


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (v2/v3, little-endian): the values `gguf_fields` gives.

    Reads only the header, so it takes milliseconds where `gguf.GGUFReader` indexes every tensor too.
    """
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with memoryview(mapped) as view:
                return _parse(view, str(path))
    except (OSError, ValueError) as e:
        raise SlimlmError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _parse(buf: memoryview, name: str) -> dict[str, Any]:
    return parse_gguf_header(buf, name, tensors=False)[0]


def parse_gguf_header(
    buf: memoryview, name: str, tensors: bool = True
) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """Metadata, and with `tensors` the tensor directory, of a GGUF file held in `buf`.

    Returns (metadata, [(name, shape as GGUF lists it (fastest dim first), ggml type id, data offset)],
    offset of the data section (aligned to general.alignment)); the last two are empty/0 without `tensors`.
    """
    if len(buf) < 24 or bytes(buf[:4]) != b"GGUF":
        raise SlimlmError(f"{name} is not a GGUF file (no GGUF magic number)")
    version, n_tensors, kv_count = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise SlimlmError(
            f"{name}: GGUF version {version} is not supported (2 and 3 are; re-convert the file)"
        )
    reader = _Reader(buf)
    reader.pos = 24
    out = {}
    directory: list[tuple[str, tuple[int, ...], int, int]] = []
    try:
        for _ in range(kv_count):
            key = reader.string()
            out[key] = reader.value(reader.scalar("<I"))
        if not tensors:
            return out, directory, 0
        for _ in range(n_tensors):
            tensor_name = reader.string()
            n_dims = reader.scalar("<I")
            if n_dims > 8:
                raise IndexError(f"tensor {tensor_name!r} claims {n_dims} dimensions")
            shape = tuple(reader.scalar("<Q") for _ in range(n_dims))
            directory.append((tensor_name, shape, reader.scalar("<I"), reader.scalar("<Q")))
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise SlimlmError(f"{name}: GGUF metadata is truncated or corrupt ({e})") from None
    alignment = out.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise SlimlmError(f"{name}: GGUF general.alignment {alignment!r} is not a positive integer")
    return out, directory, -(-reader.pos // alignment) * alignment


class _Reader:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("<Q")
        if self.pos + size > len(self.buf):
            raise IndexError("string runs past the end of the file")
        text = bytes(self.buf[self.pos : self.pos + size]).decode("utf-8", errors="replace")
        self.pos += size
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind][0])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise IndexError(f"unknown GGUF value type {kind}")
        item_kind, count = self.scalar("<I"), self.scalar("<Q")
        if item_kind in _SCALARS:
            dtype = np.dtype(_SCALARS[item_kind][1]).newbyteorder("<")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += values.nbytes
            return values.tolist()
        return [self.value(item_kind) for _ in range(count)]
