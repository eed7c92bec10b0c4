"""Streaming text per sequence: incremental detokenization plus stop strings that may span tokens."""

from __future__ import annotations

from slimlm.engine.params import SamplingParams


class StopChecker:
    """push(token) -> text safe to emit now. Text that could be the start of a stop string is held back
    until it either completes the stop string (generation stops, the stop string is cut) or cannot."""

    def __init__(self, tokenizer, params: SamplingParams) -> None:
        from slimlm.tokenizer import IncrementalDecoder

        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.held = ""
        self.stopped = False
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        pending = self.held + self.decoder.push(token_id)
        if not self.stops:
            self.held = ""
            return self._emit(pending)
        cut = None
        for stop in self.stops:
            index = pending.find(stop)
            if index != -1 and (cut is None or index < cut[0]):
                cut = (index, stop)
        if cut is not None:
            index, stop = cut
            self.stopped = True
            self.held = ""
            return self._emit(pending[: index + len(stop)] if self.include_stop else pending[:index])
        keep = _longest_stop_prefix_suffix(pending, self.stops)
        self.held = pending[len(pending) - keep :] if keep else ""
        return self._emit(pending[: len(pending) - keep])

    def flush(self) -> str:
        """At the end (not stopped by a string): release what was held back."""
        if self.stopped:
            return ""
        held, self.held = self.held + self.decoder.flush(), ""
        return self._emit(held)

    def _emit(self, text: str) -> str:
        self.text += text
        return text


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
