"""What a finished request returns. Its own module so that the `LLM` facade (slimlm/engine/llm.py) and the
decoders it calls (slimlm/engine/beam.py) both import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[Any] = field(default_factory=list)
    num_cached_tokens: int = 0
