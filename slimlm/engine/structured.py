"""What a request's output must look like: a JSON schema, any JSON object, a regex, a choice or a grammar.

Plain data, checked for shape only when it is built (no grammar engine is imported here): whether the
schema, regex or grammar compiles is checked by `slimlm.engine.constraints` when the engine accepts the
request. Field names follow vLLM's `StructuredOutputsParams`.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

from slimlm.errors import SlimlmError

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of: `json` (a JSON schema, dict or JSON text), `json_object=True` (any JSON object),
    `regex` (the whole output matches it), `choice` (the output is one of these strings), `grammar`
    (a Lark grammar as llguidance reads it; see docs/structured.md)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if (getattr(self, k) not in (None, False))]
        if len(given) != 1:
            what = ", ".join(given) if given else "none"
            raise SlimlmError(
                f"structured output needs exactly one of json, json_object, regex, choice, grammar (got {what})"
            )
        if self.json is not None:
            object.__setattr__(self, "json", _schema_dict(self.json))
        if not isinstance(self.json_object, bool):
            raise SlimlmError(f"structured output json_object={self.json_object!r} must be True or False")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SlimlmError(f"structured output {name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (
                isinstance(self.choice, str)
                or not isinstance(self.choice, list | tuple)
                or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)
            ):
                raise SlimlmError(
                    f"structured output choice must be a non-empty list of non-empty strings, got {self.choice!r}"
                )
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple[str, str]:
        """(kind, canonical text): equal keys compile to the same grammar."""
        kind = self.kind
        if kind == "json":
            return kind, _json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if kind == "json_object":
            return kind, ""
        if kind == "choice":
            return kind, "\x00".join(self.choice)  # type: ignore[arg-type]
        return kind, getattr(self, kind)

    @classmethod
    def from_dict(cls, value: Any) -> StructuredOutputs:
        """From vLLM's JSON body shape, e.g. {"json": {...}} or {"regex": "[0-9]+"}."""
        if isinstance(value, StructuredOutputs):
            return value
        if not isinstance(value, dict):
            raise SlimlmError(f"structured output must be an object like {{'regex': '...'}}, got {value!r}")
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise SlimlmError(
                f"structured output has unknown field(s) {', '.join(unknown)}; use one of {', '.join(KINDS)}"
            )
        return cls(**value)


def _schema_dict(schema: Any) -> dict:
    if isinstance(schema, str):
        try:
            schema = _json.loads(schema)
        except ValueError as e:
            raise SlimlmError(f"the JSON schema is not valid JSON: {e}") from None
    if isinstance(schema, bool):  # true / false are valid schemas; true means any JSON value
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise SlimlmError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return schema
