"""Streaming detokenization: text for each new token, holding back incomplete characters."""

from __future__ import annotations

from slimlm.errors import SlimlmError
from slimlm.tokenizer.core import Tokenizer

_REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete UTF-8 sequence


class IncrementalDecoder:
    """`push(token_id)` returns only the text that became final with that token.

    Text is decoded over a short window of recent tokens and the part past what was already returned
    is emitted, so decoder rules that look at neighbours (SentencePiece's leading-space strip, byte
    fallback pieces, byte-level pieces of one character) come out as in a full decode. Trailing
    U+FFFD (an unfinished multi-byte character) is held back until a later token completes it;
    `flush()` releases whatever is still held at the end.

    Concatenating every push and the flush equals `tokenizer.decode(all_ids, skip_special_tokens)`
    whenever the tokens spell valid UTF-8. (A SentencePiece byte run that turns out invalid is shown
    whole as U+FFFD by a full decode, characters that had already completed included; a stream has
    already emitted those characters.)
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # tokens that cannot start the window: skipped specials decode to nothing, and byte pieces are
        # joined with their neighbours by the decoder
        self._no_start = tokenizer.byte_fallback_ids | (
            tokenizer.special_token_ids if skip_special_tokens else frozenset()
        )
        self._window: list[int] = []
        self._emitted = 0  # characters of decode(window) already returned

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < self.tokenizer.vocab_size:  # the backend would silently decode nothing
            raise SlimlmError(
                f"token id {token_id} is outside the vocabulary (0..{self.tokenizer.vocab_size - 1})"
            )
        self._window.append(token_id)
        text = self._decode(self._window)
        stable = text.rstrip(_REPLACEMENT)
        new = stable[self._emitted :]
        self._emitted = max(self._emitted, len(stable))
        if len(stable) == len(text):
            self._shrink()
        return new

    def flush(self) -> str:
        """Whatever is still held back (only a trailing U+FFFD the stream ended on)."""
        rest = self._decode(self._window)[self._emitted :] if self._window else ""
        self._window, self._emitted = [], 0
        return rest

    def _shrink(self) -> None:
        """Start the window at its last visible, non-byte token: it stays as context for the next one
        (SentencePiece strips the leading space of a decode's first token only)."""
        window = self._window
        start = next((i for i in range(len(window) - 1, 0, -1) if window[i] not in self._no_start), 0)
        if start:
            self._window = window[start:]
            self._emitted = len(self._decode(self._window))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
