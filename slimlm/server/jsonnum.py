"""JSON numbers like `5.0` in integer fields: JSON Schema (and so OpenAPI clients and fuzzers) counts
a number with a zero fraction as an integer, while pydantic's strict mode refuses every float. The
request models convert such values before strict validation; strings such as "5" stay errors."""

from __future__ import annotations

import types
import typing
from typing import Any


def _int_shapes(annotation: Any) -> tuple[bool, bool]:
    """-> (the field accepts a plain int, the field accepts a list of ints)."""
    plain = listed = False
    args = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    for arg in args:
        if arg is int:
            plain = True
        elif typing.get_origin(arg) is list and typing.get_args(arg) == (int,):
            listed = True
    return plain, listed


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def integral_floats_to_ints(model: type, data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    out = None
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        if name not in data:
            continue
        plain, listed = _int_shapes(info.annotation)
        value = data[name]
        if plain and isinstance(value, float):
            new = _whole(value)
        elif listed and isinstance(value, list) and any(isinstance(v, float) for v in value):
            new = [_whole(v) for v in value]
        else:
            continue
        if out is None:
            out = dict(data)
        out[name] = new
    return data if out is None else out
