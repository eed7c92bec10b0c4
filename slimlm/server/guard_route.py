"""`slimlm serve --guard`: approved-reply snapping around the generation routes, and /v1/embeddings.

The guard is an ASGI middleware placed inside the API-key and body-size checks. For a guarded
request it takes out the extra `stage` field, asks the app for the whole answer (a streamed request
is run as a plain one), snaps each choice with `slimlm.guard.policy.Guard` and answers with the
approved text and a `guard` record per choice; a streaming client gets that final text as SSE
chunks once the answer is complete. Raw model text (and its logprobs) never leaves the server.
The middleware also appends the guard's counters to /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slimlm.server.errors import APIError, error_response
from slimlm.server.responses import ResponseMeta, chat_chunk, completion_chunk, usage_chunk
from slimlm.server.streaming import sse

log = logging.getLogger("slimlm.server.guard")
GUARDED = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
MAX_EMBEDDING_INPUTS = 2048


def install_guard(app, guard=None, embedder=None) -> None:
    """Add /v1/embeddings (with an embedder) and the snapping middleware (with a guard) to `app`."""
    if embedder is not None:
        add_embeddings_route(app, embedder)
    if guard is not None:
        # innermost of the user middleware: API key and body size are checked before the guard reads
        engine = getattr(app.state, "engine", None)
        app.user_middleware.append(Middleware(GuardMiddleware, guard=guard, engine=engine))
        app.state.guard = guard


# ---- /v1/embeddings ----
class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def add_embeddings_route(app, embedder) -> None:
    async def embeddings(req: EmbeddingRequest) -> dict:
        if req.model != embedder.model_id:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist; embeddings come from {embedder.model_id}",
                param="model",
                code="model_not_found",
            )
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise APIError(
                400, "'input' is empty; send a string or a non-empty list of strings", param="input"
            )
        if not all(isinstance(t, str) for t in texts):
            raise APIError(
                400, "'input' must be text: token-id input is not supported by this server", param="input"
            )
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise APIError(
                400, f"'input' has {len(texts)} items; at most {MAX_EMBEDDING_INPUTS}", param="input"
            )
        if any(not t for t in texts):
            raise APIError(400, "'input' holds an empty string; every input must be non-empty", param="input")
        if req.dimensions is not None and req.dimensions != embedder.dim:
            raise APIError(
                400,
                f"'dimensions' must be {embedder.dim} for {embedder.model_id} (or left out)",
                param="dimensions",
            )
        vectors, tokens = await asyncio.to_thread(
            lambda: (embedder.encode(texts), embedder.count_tokens(texts))
        )
        data = []
        for i, v in enumerate(vectors):
            if req.encoding_format == "base64":
                emb = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
            else:
                emb = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": data,
            "model": embedder.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"], tags=["embeddings"])


# ---- the snapping middleware ----
def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls: the client's http.disconnect, seen by the app's watch

    return replay


async def _read_body(receive: Receive) -> bytes | None:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _capture(app: ASGIApp, scope: Scope, receive: Receive) -> tuple[int, list, bytes]:
    start: dict = {}
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return start.get("status", 500), list(start.get("headers", [])), b"".join(chunks)


async def _send_raw(send: Send, status: int, headers: list, body: bytes) -> None:
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Taken:
    def __init__(self, stage, user, stream: bool, include_usage: bool) -> None:
        self.stage, self.user, self.stream, self.include_usage = stage, user, stream, include_usage


def _take_fields(kind: str, data: dict) -> _Taken:
    """Remove the guard's own field and turn streaming off for the inner call; refuse raw-text leaks."""
    stage = data.pop("stage", None)
    if stage is not None and (not isinstance(stage, str) or not stage):
        raise APIError(
            400, "'stage' must be a non-empty string (a dialogue stage of the fallbacks file)", param="stage"
        )
    if kind == "chat" and (data.get("logprobs") or data.get("top_logprobs")):
        raise APIError(
            400,
            "logprobs are not available with --guard: they would reveal the model's raw answer",
            param="logprobs",
        )
    if kind == "completion":
        for name in ("logprobs", "echo", "suffix"):
            if data.get(name) not in (None, False):
                raise APIError(400, f"'{name}' is not available on a guarded server", param=name)
    user = data.get("user") if isinstance(data.get("user"), str) else None
    stream = data.get("stream") is True
    include_usage = False
    if stream:
        options = data.pop("stream_options", None)
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        data["stream"] = False
    return _Taken(stage, user, stream, include_usage)


class GuardMiddleware:
    def __init__(self, app: ASGIApp, guard, engine=None) -> None:
        self.app = app
        self.guard = guard
        # decisions run on the engine's thread between two steps (AsyncEngine.run): torch there uses
        # the OpenMP pool the decode kernel already spins, where a worker thread's torch calls were
        # about twice as slow on 2 cores (docs/guard.md), and the embedding does not fight the decode
        # threads for the cores; without an engine (tests of the middleware alone) a worker thread
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            await self._metrics(scope, receive, send)
            return
        kind = GUARDED.get(scope["path"])
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):  # the app answers the 400 for a body that is not an object
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            taken = _take_fields(kind, data)
        except APIError as e:
            await error_response(e.status, e.message, param=e.param, code=e.code)(scope, receive, send)
            return
        inner_body = json.dumps(data).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(inner_body)).encode()))
        inner = {**scope, "headers": headers}
        status, out_headers, out_body = await _capture(self.app, inner, _replay(inner_body, receive))
        if status != 200:
            await _send_raw(send, status, out_headers, out_body)
            return
        result = json.loads(out_body)
        field = "message" if kind == "chat" else None
        answers = [c["message"]["content"] or "" if field else c["text"] for c in result["choices"]]
        try:
            if self.engine is not None and hasattr(self.engine, "run"):
                decisions = await self.engine.run(self.guard.decide_many, answers, taken.stage, taken.user)
            else:
                decisions = await asyncio.to_thread(self.guard.decide_many, answers, taken.stage, taken.user)
        except Exception:  # never fall back to the raw answer
            log.exception("the guard failed")
            await error_response(
                500, "the guard failed on this answer; details are in the server log", code="guard_failure"
            )(scope, receive, send)
            return
        for choice, d in zip(result["choices"], decisions, strict=True):
            if field:
                choice["message"]["content"] = d.text
            else:
                choice["text"] = d.text
            choice["guard"] = d.record
        if taken.stream:
            await self._stream(kind, result, taken.include_usage, send)
        else:
            await JSONResponse(result)(scope, receive, send)

    @staticmethod
    async def _stream(kind: str, result: dict, include_usage: bool, send: Send) -> None:
        """The approved text as an OpenAI stream: a role chunk, the text in one chunk, the finish chunk."""
        meta = ResponseMeta(kind, result["model"], result["id"], result["created"])
        events = []
        for c in result["choices"]:
            i = c["index"]
            if kind == "chat":
                events.append(
                    chat_chunk(meta, i, {"role": "assistant", "content": ""}, with_usage=include_usage)
                )
                events.append(
                    chat_chunk(meta, i, {"content": c["message"]["content"]}, with_usage=include_usage)
                )
                last = chat_chunk(meta, i, {}, c["finish_reason"], with_usage=include_usage)
            else:
                events.append(completion_chunk(meta, i, c["text"], with_usage=include_usage))
                last = completion_chunk(meta, i, "", c["finish_reason"], with_usage=include_usage)
            last["choices"][0]["guard"] = c["guard"]
            events.append(last)
        if include_usage:
            u = result["usage"]
            events.append(usage_chunk(meta, u["prompt_tokens"], u["completion_tokens"]))
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for e in events:
            await send({"type": "http.response.body", "body": sse(e).encode(), "more_body": True})
        await send({"type": "http.response.body", "body": sse("[DONE]").encode(), "more_body": False})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, headers, body = await _capture(self.app, scope, receive)
        if status == 200:
            body += ("\n".join(self.guard.metrics_lines()) + "\n").encode()
        await _send_raw(send, status, headers, body)
