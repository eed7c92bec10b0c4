"""Grammar-constrained decoding: one llguidance matcher per constrained sequence, masks for the batch.

Each step the engine asks `mask(logits, seqs)` for the constrained rows only: llguidance fills one
bit per token (allowed or not) into a [rows, ceil(V/32)] int32 bitmask, and the disallowed logits of
those rows become -inf before the sampler runs, so penalties, temperature, top-k/p and seeded draws
work unchanged on what is left. Unconstrained rows are not touched. After sampling, `advance` feeds
each row its token; a grammar that is complete (`is_stopped`) ends its sequence with "stop".

Why llguidance over xgrammar: see docs/structured.md (compile time and mask time measured here).
Grammars compile lazily inside llguidance, so a request's grammar is validated once when it is added
(`check`, cached by its text) and each matcher costs little to create.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from slimlm.engine.structured import StructuredOutputs
from slimlm.errors import SlimlmError

_INSTALL = "structured output needs llguidance: pip install 'slimlm[structured]'"


def _llguidance():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401  (the bitmask helpers)
    except ImportError:
        raise SlimlmError(_INSTALL) from None
    return llguidance


def grammar_text(spec: StructuredOutputs) -> str:
    """The llguidance grammar (its JSON form) for one spec; raises SlimlmError on a bad schema/regex/grammar."""
    llg = _llguidance()
    kind = spec.kind
    try:
        if kind in ("json", "json_object"):
            schema = spec.json if kind == "json" else {"type": "object"}
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_STYLE)
        if kind == "regex":
            return llg.grammar_from("regex", spec.regex)
        if kind == "choice":
            return llg.grammar_from("choice", json.dumps(list(spec.choice)))  # type: ignore[arg-type]
        return llg.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark
    except (ValueError, TypeError, RuntimeError) as e:
        raise SlimlmError(f"the {_KIND_NAMES[kind]} cannot be used: {_first_line(e)}") from None


# One line, ", " and ": " between items (what json.dumps writes): free whitespace let small models
# wander into runs of newlines before finishing an object. A schema's "x-guidance" can override it.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_KIND_NAMES = {
    "json": "JSON schema",
    "json_object": "JSON object format",
    "regex": "regex",
    "choice": "choice list",
    "grammar": "grammar",
}


def _first_line(error: object) -> str:
    """The engine's message on one line (it spreads regex errors over several), at most 300 characters."""
    text = " ".join(str(error).split())
    return (text[:297] + "...") if len(text) > 300 else (text or type(error).__name__)


@lru_cache(maxsize=8)
def _tokenizer_for(backend_json: str, eos_token_ids: tuple[int, ...], vocab: int):
    """llguidance's view of the tokenizer (its token bytes and "slices"); building it costs ~1 s, so it
    is shared by every engine over the same tokenizer."""
    return _llguidance().LLTokenizer(backend_json, n_vocab=vocab, eos_token=list(eos_token_ids))


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, ceil(V/32)] int32, bit j of word w = token 32w + j -> bool [rows, V] (True = allowed)."""
    # numpy's unpackbits: torch's uint8 shifts took ~1000x longer here (docs/structured.md)
    as_bytes = bitmask.contiguous().numpy().view(np.uint8)  # little-endian words: LSB-first bytes
    bits = np.unpackbits(as_bytes, axis=-1, count=vocab, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))


class Constraints:
    """Matchers of the engine's constrained sequences (seq_id -> matcher) and the batch mask."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's)
        eos = list(eos_token_ids) or [tokenizer.eos_token_id]
        self.eos_token_ids = tuple(t for t in eos if t is not None)
        self.matchers: dict[int, Any] = {}
        self._grammars: dict[tuple[str, str], str] = {}
        self._lltok = None
        self.mask_seconds = 0.0  # time spent filling and applying masks (benchmarks read it)
        self.mask_steps = 0

    @property
    def lltokenizer(self):
        if self._lltok is None:
            if not self.eos_token_ids:
                raise SlimlmError("structured output needs an end-of-sequence token; this tokenizer has none")
            self._lltok = _tokenizer_for(self.tokenizer.backend.to_str(), self.eos_token_ids, self.vocab_size)
        return self._lltok

    def check(self, spec: StructuredOutputs) -> str:
        """Compile-check `spec` against this tokenizer (cached); raises SlimlmError naming the problem."""
        key = spec.cache_key()
        grammar = self._grammars.get(key)
        if grammar is None:
            llg = _llguidance()
            grammar = grammar_text(spec)
            problem = llg.LLMatcher.validate_grammar(grammar, self.lltokenizer)
            if problem:
                raise SlimlmError(f"the {_KIND_NAMES[spec.kind]} cannot be used: {_first_line(problem)}")
            if len(self._grammars) > 256:
                self._grammars.clear()
            self._grammars[key] = grammar
        return grammar

    # ---- per sequence ----
    def register(self, seq_id: int, spec: StructuredOutputs | None) -> None:
        if spec is None:
            return
        llg = _llguidance()
        matcher = llg.LLMatcher(self.lltokenizer, self.check(spec), log_level=0)
        if matcher.is_error():
            raise SlimlmError(
                f"the {_KIND_NAMES[spec.kind]} cannot be used: {_first_line(matcher.get_error())}"
            )
        self.matchers[seq_id] = matcher

    def forget(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)

    def __bool__(self) -> bool:
        return bool(self.matchers)

    # ---- per step ----
    @torch.inference_mode()  # the runner's logits are inference tensors; masking them in place is allowed here
    def mask(self, logits: torch.Tensor, seqs: list) -> torch.Tensor:
        """-inf on every token the grammar forbids, in the constrained rows only (in place; returns logits)."""
        rows = [(i, self.matchers[s.seq_id]) for i, s in enumerate(seqs) if s.seq_id in self.matchers]
        if not rows:
            return logits
        start = time.perf_counter()
        vocab = logits.shape[-1]
        bitmask = torch.empty((len(rows), (vocab + 31) // 32), dtype=torch.int32)
        for j, (_, matcher) in enumerate(rows):
            row = bitmask[j]
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        allowed = unpack_bitmask(bitmask, vocab)
        index = [i for i, _ in rows]
        if logits.device.type == "cpu" and logits.is_contiguous() and logits.dtype == torch.float32:
            # numpy, one thread: torch's parallel ops here waited on OpenMP workers shared with the
            # decode kernel, 100+ ms per step on a busy machine (docs/structured.md)
            values = logits.numpy()
            values[index] = np.where(allowed.numpy(), values[index], -np.inf)
        else:
            at = torch.tensor(index, dtype=torch.long, device=logits.device)
            sub = logits.index_select(0, at).masked_fill_(~allowed.to(logits.device), float("-inf"))
            logits.index_copy_(0, at, sub)
        self.mask_seconds += time.perf_counter() - start
        self.mask_steps += 1
        return logits

    def advance(self, seqs: list, token_ids: list[int]) -> list:
        """Feed each constrained sequence its new token -> the sequences whose grammar is complete."""
        done = []
        for seq, token in zip(seqs, token_ids, strict=True):
            matcher = self.matchers.get(seq.seq_id)
            if matcher is None or seq.is_finished:
                continue
            matcher.consume_token(token)
            if matcher.is_stopped() or matcher.is_error():
                done.append(seq)
        return done
