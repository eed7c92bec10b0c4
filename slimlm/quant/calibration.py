"""Calibration text for AWQ/GPTQ, and the evaluation text it must never overlap.

The default corpus is CPython's `pydoc_data.topics` (English prose nobody here wrote). Its topic keys
are sorted and split in half: the eval text is the first half's topics joined with blank lines, the
calibration text the second half's, minus every paragraph that also occurs in the eval text (topics
share passages: "if" and "else" are identical, "compound" repeats the statement sections; about 45 KB
of the second half). Both slices are fixed, so a perplexity measured on `eval_text()` never scores a
passage the quantizer was calibrated on. Users may give any .txt file instead, or a .jsonl
file whose lines are objects with a "text" field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from slimlm.errors import SlimlmError


def _topic_halves() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    return [topics[k] for k in keys[:half]], [topics[k] for k in keys[half:]]


def eval_text() -> str:
    """The evaluation slice of pydoc_data.topics: the first half of the sorted topic keys."""
    return "\n\n".join(_topic_halves()[0])


def calibration_text() -> str:
    """The calibration slice: the second half of the sorted topic keys, without eval paragraphs."""
    evaluation = eval_text()
    paragraphs = (p for topic in _topic_halves()[1] for p in topic.split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p.strip() and p not in evaluation)


def load_text(path: str | Path, what: str = "calibration file") -> str:
    """Read a plain-text file, or a JSONL file (by suffix) whose lines hold a "text" field."""
    path = Path(path)
    if not path.is_file():
        raise SlimlmError(f"{what} {path} does not exist: give a .txt or .jsonl file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".jsonl":
        return raw
    texts = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimlmError(
                f"{path}:{line_no} is not valid JSON ({e.msg}): each line must be an object"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SlimlmError(
                f'{path}:{line_no} has no string "text" field: write {{"text": "..."}} per line'
            )
        texts.append(record["text"])
    return "\n\n".join(texts)


def calibration_batches(
    encode: Callable[[str], list[int]],
    text: str | None = None,
    num_samples: int = 128,
    seqlen: int = 512,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Tokenize `text` (default: `calibration_text()`) and cut it into `num_samples` windows of `seqlen`.

    Windows are consecutive and non-overlapping; returns LongTensors [batch, seqlen] of up to `batch_size`.
    """
    if num_samples < 1 or seqlen < 2 or batch_size < 1:
        raise SlimlmError(
            f"need calibration samples >= 1 and sequence length >= 2, got {num_samples} and {seqlen}"
        )
    ids = encode(calibration_text() if text is None else text)
    available = len(ids) // seqlen
    if available < num_samples:
        raise SlimlmError(
            f"the calibration text has {len(ids)} tokens, enough for {available} samples of {seqlen}: "
            f"ask for at most {available} samples, shorter samples, or give a longer text"
        )
    windows = torch.tensor(ids[: num_samples * seqlen], dtype=torch.long).view(num_samples, seqlen)
    return list(windows.split(batch_size))
