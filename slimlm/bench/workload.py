"""The benchmark workload: prompts of an exact token length cut from text nobody here wrote."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Short prompts whose greedy continuations the engine tests and benchmarks compare token by token.
REFERENCE_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3,",
    "The three primary colors are red, yellow and",
    "Python's `with` statement is used to",
]


def corpus_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def make_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n different prompts of exactly `length` tokens (consecutive windows of the corpus)."""
    text = corpus_text()[:200_000]
    # Only as much text as the prompts need, with a margin (under ~4 characters a token here), so that
    # the benchmark's own tokenizing does not add to the peak RSS it measures; the windows are the same
    # tokens as from the whole text, because the cut lies far past the last one.
    head = 8 * n * length + 4096
    ids = tokenizer.encode(text[:head], add_special_tokens=False)
    if len(ids) < 2 * n * length and head < len(text):
        ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n * length:
        raise ValueError("corpus too short for the requested prompts")
    return [ids[i * length : (i + 1) * length] for i in range(n)]


@dataclass
class Measurement:
    name: str
    values: list[float] = field(default_factory=list)
    unit: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


def repeat(fn: Callable[[], float], runs: int) -> list[float]:
    return [fn() for _ in range(runs)]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result
