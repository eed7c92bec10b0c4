"""OpenAI response and stream-chunk JSON shapes, built from the engine's per-choice results."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from slimlm.engine.engine import StepOutput


@dataclass
class ResponseMeta:
    """Fields every response and chunk of one request share."""

    kind: str  # "chat" | "completion"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex


@dataclass
class ChoiceResult:
    """What one choice has produced so far."""

    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # TokenLogprobs per generated token, when asked

    def add(self, out: StepOutput) -> None:
        if out.token_id is not None:
            self.num_tokens += 1
        self.text += out.text
        if out.logprob is not None:
            self.logprobs.append(out.logprob)
        if out.finished:
            self.finish_reason = out.finish_reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---- logprobs ----
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, entries: list) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries
        ]
    }


def completion_logprobs(tokenizer, entries: list, text_offset: int = 0) -> dict:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        text = _token_text(tokenizer, e.token_id)
        offsets.append(text_offset)
        text_offset += len(text)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top.append({_token_text(tokenizer, t): lp for t, lp in e.top})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


# ---- whole responses ----
def chat_completion(meta: ResponseMeta, choices: list[ChoiceResult], prompt_tokens: int, tokenizer) -> dict:
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(tokenizer, c.logprobs) if c.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, sum(c.num_tokens for c in choices)),
    }


def completion(
    meta: ResponseMeta, choices: list[ChoiceResult], prompt_tokens: int, tokenizer, echo: list[str]
) -> dict:
    n = len(choices) // max(len(echo), 1) if echo else 1
    out = []
    for i, c in enumerate(choices):
        prefix = echo[i // n] if echo else ""
        out.append(
            {
                "index": i,
                "text": prefix + c.text,
                "logprobs": completion_logprobs(tokenizer, c.logprobs, len(prefix)) if c.logprobs else None,
                "finish_reason": c.finish_reason,
            }
        )
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": None,
        "choices": out,
        "usage": usage(prompt_tokens, sum(c.num_tokens for c in choices)),
    }


# ---- stream chunks ----
def chat_chunk(
    meta: ResponseMeta,
    index: int,
    delta: dict,
    finish_reason: str | None = None,
    logprobs: dict | None = None,
    with_usage: bool = False,
) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _chunk(meta, "chat.completion.chunk", choice, with_usage)


def completion_chunk(
    meta: ResponseMeta,
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict | None = None,
    with_usage: bool = False,
) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _chunk(meta, "text_completion", choice, with_usage)


def _chunk(meta: ResponseMeta, kind: str, choice: dict, with_usage: bool) -> dict:
    chunk = {
        "id": meta.id,
        "object": kind,
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": None,
        "choices": [choice],
    }
    if with_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last when include_usage is set
    return chunk


def usage_chunk(meta: ResponseMeta, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if meta.kind == "chat" else "text_completion"
    return {
        "id": meta.id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }
