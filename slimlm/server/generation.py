"""The two generation endpoints: translate, submit to the engine thread, answer whole or streamed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from slimlm.engine.engine import StepOutput
from slimlm.engine.scoring import prompt_logprobs
from slimlm.server.async_engine import AsyncEngine, EngineFailure, RequestStream
from slimlm.server.errors import APIError, error_body
from slimlm.server.logprobs import add_prompt_logprobs, content_only, prompt_logprobs_dict
from slimlm.server.metrics import Metrics
from slimlm.server.protocol import ChatCompletionRequest, CompletionRequest
from slimlm.server.responses import (
    ChoiceResult,
    ResponseMeta,
    chat_chunk,
    chat_completion,
    chat_logprobs,
    completion,
    completion_chunk,
    completion_logprobs,
    usage_chunk,
)
from slimlm.server.streaming import ClientGone, EventStream, sse, unless_disconnected
from slimlm.server.tools import ToolStream, apply_to_body
from slimlm.server.translate import Prepared, prepare_chat, prepare_completion
from slimlm.server.validation import check_limits

_ENGINE_FAILED = "the engine failed while generating this request; it was aborted (details in the server log)"


class _NoOutput:
    """The stream of a request that generates nothing (echo with max_tokens 0)."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise StopAsyncIteration

    def abort(self) -> None:
        pass


class ConcurrencyLimit:
    """At most `max_requests` generation requests in flight; the next one gets 429 + Retry-After."""

    def __init__(self, max_requests: int, metrics: Metrics) -> None:
        self.max_requests = max_requests
        self.metrics = metrics

    def acquire(self) -> Callable[[], None]:
        if self.metrics.in_flight >= self.max_requests:
            self.metrics.rejected_busy += 1
            raise APIError(
                429,
                f"the server is busy: {self.max_requests} requests are in flight; retry shortly",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.metrics.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.metrics.in_flight -= 1

        return release


class _Timing:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.first: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.metrics.time_to_first_token.observe(self.first - self.start)

    def done(self, choices: list[ChoiceResult]) -> None:
        self.metrics.request_latency.observe(time.perf_counter() - self.start)
        for c in choices:
            self.metrics.finish_reasons[c.finish_reason or "unknown"] += 1


class Generation:
    """Handlers for /v1/chat/completions and /v1/completions over one AsyncEngine."""

    def __init__(
        self, llm, engine: AsyncEngine, metrics: Metrics, limit: ConcurrencyLimit, model_names: list[str]
    ):
        self.llm = llm
        self.engine = engine
        self.metrics = metrics
        self.limit = limit
        self.model_names = model_names

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        return await self._serve("chat", req, request)

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        return await self._serve("completion", req, request)

    async def _serve(self, kind: str, req, request: Request) -> Response:
        if req.model not in self.model_names:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist; this server serves {', '.join(self.model_names)}",
                param="model",
                code="model_not_found",
            )
        check_limits(req, self.llm.config.vocab_size)
        release = self.limit.acquire()
        try:
            prepare = prepare_chat if kind == "chat" else prepare_completion
            prepared = await asyncio.to_thread(prepare, self.llm, req)
            prompt_parts = await self._prompt_logprobs(kind, req, prepared)
            timing = _Timing(self.metrics)
            # max_tokens 0 with echo scores the prompt and generates nothing
            stream = await self.engine.submit(prepared.requests) if prepared.requests else _NoOutput()
        except BaseException:
            release()
            raise
        self.metrics.requests[kind] += 1
        meta = ResponseMeta(kind, req.model)

        def close() -> None:
            stream.abort()
            release()

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._events(stream, prepared, meta, timing, include_usage, prompt_parts)
            return EventStream(events, close)
        try:
            choices = await unless_disconnected(request, self._collect(stream, prepared, timing, kind))
        except ClientGone:
            return Response(status_code=499)
        except EngineFailure:
            raise APIError(500, _ENGINE_FAILED, code="engine_failure") from None
        finally:
            close()
        tokenizer = self.llm.tokenizer
        if kind == "chat":
            body = chat_completion(meta, choices, prepared.num_prompt_tokens, tokenizer)
            if prepared.tools is not None:
                body = apply_to_body(body, prepared.tools)
        else:
            body = completion(meta, choices, prepared.num_prompt_tokens, tokenizer, prepared.echo_texts)
            if prompt_parts:
                body = add_prompt_logprobs(body, prompt_parts, prepared.n)
        return JSONResponse(body)

    async def _prompt_logprobs(self, kind: str, req, prepared: Prepared) -> list[dict] | None:
        """Per prompt, OpenAI's logprobs of the echoed prompt tokens (echo + logprobs), else None."""
        if kind != "completion" or not req.echo or req.logprobs is None:
            return None
        model, tokenizer = getattr(self.llm.engine, "model", None), self.llm.tokenizer
        if model is None:  # Ray replicas (slimlm/cluster): the ingress has no weights to score with
            raise APIError(
                400,
                "prompt logprobs (echo with logprobs) are not served by --replicas; use one slimlm serve",
                param="echo",
            )
        parts = []
        for ids in prepared.prompts:
            entries = await self.engine.run(prompt_logprobs, model, ids, req.logprobs)
            parts.append(prompt_logprobs_dict(tokenizer, ids, entries))
        return parts

    def _visible(self, kind: str, prepared: Prepared, index: int, out: StepOutput) -> StepOutput:
        if kind != "chat" or out.logprob is None:
            return out
        params = prepared.requests[index][1]
        return content_only(out, params, self.llm.engine.eos_token_ids, self.llm.tokenizer)

    async def _collect(
        self, stream: RequestStream, prepared: Prepared, timing: _Timing, kind: str
    ) -> list[ChoiceResult]:
        choices = [ChoiceResult() for _ in range(len(prepared.prompts) * prepared.n)]
        async for index, out in stream:
            timing.token()
            choices[index].add(self._visible(kind, prepared, index, out))
        for c in choices:
            if not prepared.requests:  # scored only
                c.finish_reason = "length"
        timing.done(choices)
        return choices

    async def _events(
        self,
        stream: RequestStream,
        prepared: Prepared,
        meta: ResponseMeta,
        timing: _Timing,
        include_usage: bool,
        prompt_parts: list[dict] | None = None,
    ) -> AsyncIterator[str]:
        tokenizer = self.llm.tokenizer
        is_chat = meta.kind == "chat"
        choices = [ChoiceResult() for _ in range(len(prepared.prompts) * prepared.n)]
        offsets = [0] * len(choices)  # completion logprobs' text_offset
        tool_streams = [ToolStream(prepared.tools) for _ in choices] if prepared.tools is not None else None

        def chunk(
            index: int, text: str | None, finish: str | None = None, logprobs: dict | None = None
        ) -> str:
            if is_chat:
                delta = {} if text is None else {"content": text}
                return sse(chat_chunk(meta, index, delta, finish, logprobs, include_usage))
            return sse(completion_chunk(meta, index, text or "", finish, logprobs, include_usage))

        try:
            for i in range(len(choices)):
                if is_chat:
                    yield sse(
                        chat_chunk(meta, i, {"role": "assistant", "content": ""}, with_usage=include_usage)
                    )
                elif prepared.echo_texts:
                    echo = prepared.echo_texts[i // prepared.n]
                    offsets[i] = len(echo)
                    yield chunk(i, echo, None, prompt_parts[i // prepared.n] if prompt_parts else None)
            async for i, out in stream:
                timing.token()
                out = self._visible(meta.kind, prepared, i, out)
                choices[i].add(out)
                logprobs = None
                if out.logprob is not None:
                    if is_chat:
                        logprobs = chat_logprobs(tokenizer, [out.logprob])
                    else:
                        logprobs = completion_logprobs(tokenizer, [out.logprob], offsets[i])
                        offsets[i] += len(logprobs["tokens"][0])
                if tool_streams is not None:  # chat with tools: text becomes content or tool-call deltas
                    for delta in tool_streams[i].feed(out.text):
                        yield sse(chat_chunk(meta, i, delta, None, None, include_usage))
                    if out.finished:
                        deltas, finish = tool_streams[i].finish(out.finish_reason)
                        for delta in deltas:
                            yield sse(chat_chunk(meta, i, delta, None, None, include_usage))
                        yield sse(chat_chunk(meta, i, {}, finish, None, include_usage))
                    continue
                if out.text or logprobs:
                    yield chunk(i, out.text, None, logprobs)
                if out.finished:
                    yield chunk(i, None, out.finish_reason)
            if not prepared.requests:  # scored only: every choice ends here
                for i, c in enumerate(choices):
                    c.finish_reason = "length"
                    yield chunk(i, None, "length")
            timing.done(choices)
            if include_usage:
                yield sse(usage_chunk(meta, prepared.num_prompt_tokens, sum(c.num_tokens for c in choices)))
        except EngineFailure:
            yield sse(error_body(500, _ENGINE_FAILED, code="engine_failure"))
        yield sse("[DONE]")
