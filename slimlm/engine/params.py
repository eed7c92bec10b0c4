"""SamplingParams: what a request asks of generation, validated once when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimlm.engine.structured import StructuredOutputs
from slimlm.errors import SlimlmError
from slimlm.settings import arg

MAX_LOGPROBS = 20
# torch.Generator.manual_seed's range; anything outside it fails only when the request is added
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _check(ok: bool, name: str, value: object, valid: str) -> None:
    if not ok:
        raise SlimlmError(f"sampling parameter {name}={value!r} is invalid: it must be {valid}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)  # type: ignore[arg-type]
    )


@dataclass
class SamplingParams:
    """Generation settings of one request.

    temperature=0 means greedy decoding. Penalties follow their reference semantics:
    `repetition_penalty` is HF transformers' (over prompt + generated tokens: a positive logit is
    divided by it, a negative one multiplied), `presence_penalty` / `frequency_penalty` are OpenAI's
    (over generated tokens only). `logprobs=k` returns the chosen token's log-probability and the
    top k alternatives (k=0: the chosen token only). `num_beams > 1` switches to beam search with
    HF transformers' semantics (`length_penalty`, `early_stopping` True/False/"never").
    """

    max_tokens: int = arg(256)
    min_tokens: int = arg(0)
    temperature: float = arg(1.0, help="0 = greedy (default: %(default)s)")
    top_p: float = arg(1.0)
    top_k: int = arg(0)
    min_p: float = arg(0.0)
    repetition_penalty: float = arg(1.0)
    presence_penalty: float = arg(0.0)
    frequency_penalty: float = arg(0.0)
    no_repeat_ngram_size: int = arg(0)
    seed: int | None = arg(None)
    stop: list[str] = arg(default_factory=list, action="append", help="stop string (repeatable)")
    stop_token_ids: list[int] = arg(default_factory=list, type=int, nargs="*")
    ignore_eos: bool = arg(False)
    logprobs: int | None = arg(None, help="return the top-N log-probabilities per token")
    num_beams: int = arg(1)
    length_penalty: float = arg(1.0)
    early_stopping: bool | str = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # output constrained to a JSON schema / regex / choice / grammar (slimlm.engine.structured)
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            "max_tokens",
            self.max_tokens,
            "an integer >= 1",
        )
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            self.min_tokens,
            f"an integer in [0, max_tokens={self.max_tokens}]",
        )
        _check(
            _is_number(self.temperature) and self.temperature >= 0,
            "temperature",
            self.temperature,
            "a number >= 0 (0 means greedy)",
        )
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(
            _is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1),
            "top_k",
            self.top_k,
            "an integer >= 1, or 0 / -1 to disable it",
        )
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            self.repetition_penalty,
            "a number > 0 (1 disables it)",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, value, "a number in [-2, 2]")
        _check(
            _is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
            "no_repeat_ngram_size",
            self.no_repeat_ngram_size,
            "an integer >= 0 (0 disables it)",
        )
        _check(
            self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
            "seed",
            self.seed,
            f"None or an integer in [{SEED_MIN}, {SEED_MAX}]",
        )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(
            isinstance(self.stop, list | tuple) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            self.stop,
            "a non-empty string or a list of non-empty strings",
        )
        self.stop = list(self.stop)
        _check(
            isinstance(self.stop_token_ids, list | tuple)
            and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            self.stop_token_ids,
            "a list of token ids (integers >= 0)",
        )
        self.stop_token_ids = list(self.stop_token_ids)
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            self.logprobs,
            f"None or an integer in [0, {MAX_LOGPROBS}]",
        )
        _check(
            _is_int(self.num_beams) and self.num_beams >= 1, "num_beams", self.num_beams, "an integer >= 1"
        )
        _check(_is_number(self.length_penalty), "length_penalty", self.length_penalty, "a finite number")
        _check(
            self.early_stopping in (True, False, "never"),
            "early_stopping",
            self.early_stopping,
            'True, False or "never"',
        )
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputs.from_dict(self.structured_outputs)
        _check(
            self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
            "structured_outputs",
            self.structured_outputs,
            "None, a StructuredOutputs or a dict like {'json': schema}",
        )
        if self.structured_outputs is not None and self.num_beams > 1:
            raise SlimlmError("structured_outputs cannot be combined with beam search (num_beams > 1)")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def use_beam_search(self) -> bool:
        return self.num_beams > 1
