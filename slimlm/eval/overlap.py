"""Does a calibration text overlap an evaluation text? Shared 13-word runs (the n-gram length the
GPT-3 paper's contamination check used), ignoring case and punctuation. A quantizer tuned on passages
it is then scored on reports a perplexity it has not earned."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

NGRAM = 13
# Stock phrases recur in any two texts of one register: the default calibration and evaluation slices
# of pydoc_data.topics share 8 of 28,573 runs (0.03%). Warn from 0.5% up (one paragraph in ~200).
MIN_FRACTION = 0.005
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class Overlap:
    shared: int  # the calibration text's 13-word runs that also occur in the evaluation text
    total: int  # the calibration text's 13-word runs
    example: str  # the first shared run

    @property
    def fraction(self) -> float:
        return self.shared / max(self.total, 1)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def find_overlap(calibration: str, evaluation: str) -> Overlap:
    ev = _words(evaluation)
    grams = {tuple(ev[i : i + NGRAM]) for i in range(len(ev) - NGRAM + 1)}
    cal = _words(calibration)
    shared, example = 0, ""
    for i in range(len(cal) - NGRAM + 1):
        gram = tuple(cal[i : i + NGRAM])
        if gram in grams:
            shared += 1
            example = example or " ".join(gram)
    return Overlap(shared, max(len(cal) - NGRAM + 1, 0), example)


def warn_overlap(calibration: str, evaluation: str, calib_name: str, eval_name: str) -> Overlap:
    """Prints a warning naming the overlap (if any) to stderr; returns it."""
    found = find_overlap(calibration, evaluation)
    if found.fraction >= MIN_FRACTION:
        print(
            f"warning: the calibration text ({calib_name}) overlaps the evaluation text ({eval_name}): "
            f"{found.shared} of its {found.total} {NGRAM}-word runs ({100 * found.fraction:.1f}%) occur in both, "
            f'e.g. "{found.example}"; perplexity there is not held out',
            file=sys.stderr,
        )
    return found
