"""Value limits of the request fields, checked before anything reaches the engine.

Pydantic checks the types; this table checks the values. The same table is written into the OpenAPI
schema (slimlm.server.openapi), so what the schema declares is what the server enforces. A value
outside these limits is a 400 naming the field: an out-of-range integer must never get as far as
torch (a seed >= 2**64 or a top_k >= 2**63 used to fail inside the engine thread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimlm.engine.params import MAX_LOGPROBS
from slimlm.server.errors import APIError
from slimlm.server.protocol import ChatCompletionRequest, CompletionRequest

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 16


@dataclass(frozen=True)
class Limit:
    """Inclusive bounds unless `exclusive_minimum`; `integer` fields also reject floats (pydantic did)."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    hint: str = ""

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.minimum is not None and (
            value <= self.minimum if self.exclusive_minimum else value < self.minimum
        ):
            return False
        return self.maximum is None or value <= self.maximum

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a number"
        lo = "-inf" if self.minimum is None else _num(self.minimum)
        hi = "inf" if self.maximum is None else _num(self.maximum)
        bracket = "(" if self.exclusive_minimum or self.minimum is None else "["
        close = ")" if self.maximum is None else "]"
        return f"{kind} in {bracket}{lo}, {hi}{close}" + (f" ({self.hint})" if self.hint else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# Fields shared by both endpoints. Floats must also be finite (JSON's NaN / Infinity are refused).
COMMON: dict[str, Limit] = {
    "temperature": Limit(0, None, hint="0 means greedy"),
    "top_p": Limit(0, 1, exclusive_minimum=True),
    "n": Limit(1, MAX_N),
    "presence_penalty": Limit(-2, 2),
    "frequency_penalty": Limit(-2, 2),
    "seed": Limit(INT64_MIN, INT64_MAX),
    "top_k": Limit(-1, INT32_MAX, hint="0 or -1 disables it; a k past the vocabulary keeps every token"),
    "min_p": Limit(0, 1),
    "repetition_penalty": Limit(0, None, exclusive_minimum=True, hint="1 disables it"),
    "no_repeat_ngram_size": Limit(0, INT32_MAX, hint="0 disables it"),
    "min_tokens": Limit(0, INT32_MAX),
}
CHAT: dict[str, Limit] = {
    **COMMON,
    "max_tokens": Limit(1, INT32_MAX),
    "max_completion_tokens": Limit(1, INT32_MAX),
    "top_logprobs": Limit(0, MAX_LOGPROBS),
}
COMPLETION: dict[str, Limit] = {
    **COMMON,
    "max_tokens": Limit(0, INT32_MAX, hint="0 only with echo: score the prompt"),
    "logprobs": Limit(0, MAX_LOGPROBS),
    "best_of": Limit(1, MAX_N),
}
# Integer items of list fields: (field, limit of each item)
ITEMS: dict[str, Limit] = {"stop_token_ids": Limit(0, INT32_MAX)}
INTEGER_FIELDS = frozenset(
    {
        "n",
        "seed",
        "top_k",
        "no_repeat_ngram_size",
        "min_tokens",
        "max_tokens",
        "max_completion_tokens",
        "top_logprobs",
        "logprobs",
        "best_of",
        "stop_token_ids",
    }
)


def limits_for(model: type) -> dict[str, Limit]:
    return CHAT if issubclass(model, ChatCompletionRequest) else COMPLETION


def check_limits(req: ChatCompletionRequest | CompletionRequest, vocab_size: int | None = None) -> None:
    """Raise a 400 naming the first field whose value is out of range."""
    for name, limit in limits_for(type(req)).items():
        value = getattr(req, name, None)
        if value is None or isinstance(value, bool):
            continue
        if not limit.admits(value):
            raise APIError(
                400,
                f"'{name}' must be {limit.describe(name in INTEGER_FIELDS)}; got {name}={value!r}",
                param=name,
                code="invalid_value",
            )
    for name, limit in ITEMS.items():
        for i, value in enumerate(getattr(req, name, None) or []):
            if not limit.admits(value) or (vocab_size is not None and value >= vocab_size):
                hi = INT32_MAX if vocab_size is None else vocab_size - 1
                raise APIError(
                    400,
                    f"'{name}[{i}]' must be a token id of this model, an integer in [0, {hi}]; got {value!r}",
                    param=f"{name}[{i}]",
                    code="invalid_value",
                )
    if isinstance(req, CompletionRequest) and req.max_tokens == 0 and not req.echo:
        raise APIError(
            400,
            "'max_tokens' must be at least 1 (0 is allowed with 'echo': true, to score the prompt only); "
            "got max_tokens=0",
            param="max_tokens",
            code="invalid_value",
        )


def pool_tokens(llm) -> int:
    """How many tokens the whole KV cache holds (one sequence can use at most this much). Behind Ray
    replicas (slimlm/cluster) the ingress holds no pool: the replicas' `kv_pool_tokens` stands in."""
    bm = getattr(llm.engine, "block_manager", None)
    if bm is None:
        return llm.engine.kv_pool_tokens
    return bm.num_blocks * bm.block_size


def check_kv_room(llm, prompt_len: int, max_tokens: int, prompt_field: str) -> None:
    """A sequence that cannot fit the whole KV pool would silently stop early with "length"."""
    pool = pool_tokens(llm)
    if prompt_len + max_tokens > pool:
        raise APIError(
            400,
            f"the KV cache holds {pool} tokens in all, but this request needs {prompt_len + max_tokens} "
            f"({prompt_len} in the {prompt_field} + max_tokens {max_tokens}); lower max_tokens or shorten "
            f"the {prompt_field}, or start the server with a larger --kv-cache-tokens",
            param="max_tokens" if prompt_len < pool else prompt_field,
            code="kv_cache_exceeded",
        )
