"""Every failure leaves the server as OpenAI's error JSON with the right status; never a traceback."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimlm.errors import SlimlmError

log = logging.getLogger("slimlm.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}
_UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "content": "a string or a list of text parts",
    "stop": "a string or a list of strings",
}
_SAMPLING_PARAM = re.compile(r"^sampling parameter (\w+)=")


class APIError(Exception):
    """An error the client should see, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_slimlm_error(e: SlimlmError) -> APIError:
    """A user mistake caught by the library (bad sampling value, prompt that cannot fit) -> 400."""
    message = str(e)
    match = _SAMPLING_PARAM.match(message)
    return APIError(400, message, param=match.group(1) if match else None)


def _param_path(loc: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; stops at pydantic's union member tags."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or not part.isidentifier() or part[0].isupper():
            break
        else:
            path += f".{part}" if path else part
    return path


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "the request body is invalid")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON; send a JSON object", code="invalid_json")
    param = _param_path(tuple(first.get("loc", ())))
    if not param:
        return APIError(
            400, "the request body must be a JSON object with the API's fields", code="invalid_body"
        )
    if kind == "extra_forbidden":
        return APIError(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if kind == "missing":
        return APIError(
            400, f"'{param}' is a required property", param=param, code="missing_required_parameter"
        )
    same = [e for e in errors if _param_path(tuple(e.get("loc", ()))) == param]
    if len(same) > 1:  # a union: every alternative failed
        hint = _UNION_HINTS.get(re.findall(r"[A-Za-z_]\w*", param)[-1])
        expected = f": it must be {hint}" if hint else ""
        return APIError(
            400, f"invalid type or value for '{param}'{expected}", param=param, code="invalid_type"
        )
    return APIError(
        400, f"invalid value for '{param}': {first.get('msg', 'invalid')}", param=param, code="invalid_type"
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        e = validation_error(exc)
        return error_response(e.status, e.message, param=e.param, code=e.code)

    @app.exception_handler(SlimlmError)
    async def _user_mistake(_: Request, exc: SlimlmError) -> JSONResponse:
        e = from_slimlm_error(exc)
        return error_response(e.status, e.message, param=e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(
            500, "internal server error; the details are in the server log", code="internal_error"
        )
