"""The OpenAPI document the server publishes, made to declare what the server really does.

FastAPI's generated document declares a 422 validation error that this server never sends (every
invalid body is a 400 in OpenAI's error shape, slimlm.server.errors) and omits the statuses it does
send, and it knows nothing of the value limits slimlm.server.validation enforces. Schema-driven
clients and fuzzers (schemathesis) then reject valid behaviour. This module rewrites the document once:
error responses per route, the limits on every numeric field, and /metrics' text format.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from slimlm.server.validation import CHAT, COMPLETION, INTEGER_FIELDS, ITEMS, Limit

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_WHY = {
    "400": "Invalid request: bad JSON, an unknown field, a wrong type, a value out of range, or a prompt "
    "that does not fit the context or the KV cache (`param` names the field).",
    "401": "Missing or wrong API key (only when the server runs with --api-key).",
    "404": "Unknown model.",
    "405": "Method not allowed on this path.",
    "413": "Request body larger than --max-body-bytes.",
    "429": "Too many requests in flight (--max-concurrent-requests); retry after Retry-After seconds.",
    "500": "The engine failed while running the request (details in the server log).",
    "503": "The engine thread is not running.",
}
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"
# what each operation can answer besides 200 (401 is added where the API key applies)
_ERRORS = {
    ("post", "/v1/chat/completions"): ("400", "404", "413", "429", "500"),
    ("post", "/v1/completions"): ("400", "404", "413", "429", "500"),
    ("get", "/v1/models/{model_id}"): ("404",),
    ("get", "/health"): ("503",),
}


def _error_response(status: str) -> dict:
    return {
        "description": _WHY[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }


def _bounds(limit: Limit, integer: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if limit.minimum is not None:
        key = "exclusiveMinimum" if limit.exclusive_minimum else "minimum"
        out[key] = int(limit.minimum) if integer else limit.minimum
    if limit.maximum is not None:
        out["maximum"] = int(limit.maximum) if integer else limit.maximum
    return out


def _apply(prop: dict, bounds: dict) -> None:
    """Add bounds to the numeric branch(es) of a property (pydantic writes `x | None` as anyOf)."""
    branches = prop.get("anyOf", [prop])
    for branch in branches:
        if branch.get("type") in ("integer", "number"):
            branch.update(bounds)
        elif branch.get("type") == "array" and branch.get("items", {}).get("type") == "integer":
            branch["items"].update(bounds)


def _add_limits(schemas: dict, name: str, table: dict[str, Limit], context_len: int | None) -> None:
    props = schemas.get(name, {}).get("properties", {})
    for field, limit in table.items():
        if field in props:
            bounds = _bounds(limit, field in INTEGER_FIELDS)
            if field in ("max_tokens", "max_completion_tokens") and context_len is not None:
                bounds["maximum"] = context_len  # prompt + completion must also fit; see 400
            _apply(props[field], bounds)
    for field, limit in ITEMS.items():
        if field in props:
            _apply(props[field], _bounds(limit, True))


def _add_shape_rules(schemas: dict) -> None:
    """Single-field rules translate.py enforces that JSON Schema can say. Rules across fields cannot be
    said (prompt + max_tokens within the context and the KV pool, min_tokens <= max_tokens, top_logprobs
    needs logprobs, best_of == n, stream_options needs stream): those stay documented 400s."""
    from slimlm.server.translate import _ROLES

    def props(name: str) -> dict:
        return schemas.get(name, {}).get("properties", {})

    if "messages" in props("ChatCompletionRequest"):
        props("ChatCompletionRequest")["messages"]["minItems"] = 1
    if "role" in props("ChatMessage"):
        props("ChatMessage")["role"]["enum"] = sorted(_ROLES)
    if "type" in props("ContentPart"):
        props("ContentPart")["type"]["enum"] = ["text"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        if "logit_bias" in props(name):
            props(name)["logit_bias"] = {
                "anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}],
                "description": "not supported: absent, null or {}",
            }
    prompt = props("CompletionRequest").get("prompt", {})
    for branch in prompt.get("anyOf", []):
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array":
            branch["minItems"] = 1
            items = branch.get("items", {})
            if items.get("type") == "array":
                items["minItems"] = 1
            elif items.get("type") == "string":
                items["minLength"] = 1


def build_openapi(
    app: FastAPI,
    open_paths: frozenset[str],
    keyed: bool,
    context_len: int | None,
    model_names: list[str] | None = None,
) -> dict:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    _add_limits(schemas, "ChatCompletionRequest", CHAT, context_len)
    _add_limits(schemas, "CompletionRequest", COMPLETION, context_len)
    _add_shape_rules(schemas)
    if model_names:  # any other name is a 404; saying so lets schema-driven tools reach the engine
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            model = schemas.get(name, {}).get("properties", {}).get("model")
            if model is not None:
                model["enum"] = list(model_names)
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            statuses = list(_ERRORS.get((method, path), ()))
            if keyed and path not in open_paths:
                statuses.append("401")
            for status in sorted(statuses):
                responses[status] = _error_response(status)
            if (method, path) in _ERRORS and path.startswith("/v1/") and method == "post":
                responses["200"] = {
                    "description": "The completion; with `stream: true`, server-sent events (one JSON "
                    "chunk per `data:` line, then `data: [DONE]`)",
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {},  # events: JSON chunks, then [DONE]
                    },
                }
            if path == "/metrics":
                responses["200"] = {
                    "description": "Prometheus text exposition format 0.0.4",
                    "content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}},
                }
            if path == "/health":
                responses["200"]["content"] = {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {"status": {"type": "string"}},
                            "required": ["status"],
                        }
                    }
                }
                responses["503"]["content"] = responses["200"]["content"]
    if keyed:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in doc["paths"].items():
            if path not in open_paths:
                for op in operations.values():
                    op["security"] = [{"bearer": []}]
    return doc


def install_openapi(
    app: FastAPI,
    open_paths: frozenset[str],
    keyed: bool,
    context_len: int | None,
    model_names: list[str] | None = None,
) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, open_paths, keyed, context_len, model_names)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
