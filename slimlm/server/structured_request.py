"""The output constraint an HTTP request asks for, from whichever field it used, checked before it runs.

OpenAI: `response_format` {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema"}}.
vLLM: `structured_outputs` {"json" | "regex" | "choice" | "grammar" | "json_object"} and the older
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. A forced tool call (tools.py) is one
more source. A request may use one of them; two are a 400.
"""

from __future__ import annotations

from slimlm.engine.structured import StructuredOutputs
from slimlm.errors import SlimlmError
from slimlm.server.errors import APIError

_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def requested_structure(req) -> tuple[StructuredOutputs | None, str | None]:
    """-> (constraint, the field it came from); 400 naming the field when it is malformed."""
    found: list[tuple[StructuredOutputs, str]] = []
    response_format = getattr(req, "response_format", None)
    if response_format is not None:
        spec = _from_response_format(response_format)
        if spec is not None:
            where = "response_format.json_schema.schema" if spec.kind == "json" else "response_format"
            found.append((spec, where))
    if req.structured_outputs is not None:
        found.append(
            (
                _build(lambda: StructuredOutputs.from_dict(req.structured_outputs), "structured_outputs"),
                "structured_outputs",
            )
        )
    for name, kind in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append((_build(lambda v=value, k=kind: StructuredOutputs(**{k: v}), name), name))
    if len(found) > 1:
        raise APIError(
            400,
            f"ask for one output format at a time; got {', '.join(f for _, f in found)}",
            param=found[1][1],
        )
    return found[0] if found else (None, None)


def _from_response_format(rf) -> StructuredOutputs | None:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutputs(json_object=True)
    if rf.type == "json_schema":
        body = rf.json_schema
        if not isinstance(body, dict) or "schema" not in body:
            raise APIError(
                400,
                "response_format.json_schema must be an object with a 'schema' (and a 'name')",
                param="response_format.json_schema",
            )
        return _build(lambda: StructuredOutputs(json=body["schema"]), "response_format.json_schema.schema")
    raise APIError(
        400,
        f"response_format type {rf.type!r} is not supported; use text, json_object or json_schema",
        param="response_format.type",
    )


def _build(make, param: str) -> StructuredOutputs:
    try:
        return make()
    except SlimlmError as e:
        raise APIError(400, str(e), param=param) from None
    except TypeError as e:  # an unknown field name in a structured_outputs object
        raise APIError(400, f"invalid {param}: {e}", param=param) from None


def check_structure(llm, spec: StructuredOutputs, param: str) -> None:
    """Compile-check against the served tokenizer (cached), so a bad schema is a 400 before it runs."""
    try:
        llm.engine.constraints.check(spec)
    except SlimlmError as e:
        raise APIError(400, str(e), param=param) from None
