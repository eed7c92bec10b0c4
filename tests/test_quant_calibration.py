"""Calibration text: the default slices never overlap the eval slice; files and batching."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.quant.calibration import calibration_batches, calibration_text, eval_text, load_text


def test_eval_and_calibration_slices_are_disjoint():
    from pydoc_data.topics import topics

    evaluation, calibration = eval_text(), calibration_text()
    assert len(evaluation) > 150_000 and len(calibration) > 150_000
    keys = sorted(topics)
    assert evaluation.startswith(topics[keys[0]]) and topics[keys[-1]] not in evaluation
    # No passage of the calibration slice occurs in the eval slice (checked paragraph by paragraph
    # and on 120-character probes across paragraph boundaries).
    assert not any(p in evaluation for p in calibration.split("\n\n"))
    probes = [calibration[i : i + 120] for i in range(0, len(calibration) - 120, 997)]
    assert not any(p in evaluation for p in probes)


def _char_encode(text: str) -> list[int]:
    return [ord(c) % 256 for c in text]


def test_calibration_batches_are_consecutive_windows():
    batches = calibration_batches(_char_encode, "abcdefghij" * 10, num_samples=5, seqlen=8, batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 8), (2, 8), (1, 8)]
    flat = torch.cat([b.reshape(-1) for b in batches])
    assert flat.tolist() == _char_encode(("abcdefghij" * 10)[:40])
    default = calibration_batches(_char_encode, num_samples=3, seqlen=16)
    assert default[0][0].tolist() == _char_encode(calibration_text()[:16])


def test_calibration_batches_bad_input():
    with pytest.raises(SlimlmError, match="enough for 2 samples of 8"):
        calibration_batches(_char_encode, "x" * 20, num_samples=3, seqlen=8)
    with pytest.raises(SlimlmError, match="enough for 0 samples"):
        calibration_batches(_char_encode, "", num_samples=1, seqlen=8)
    with pytest.raises(SlimlmError, match="need calibration samples >= 1"):
        calibration_batches(_char_encode, "x" * 100, num_samples=0, seqlen=8)


def test_load_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n")
    assert load_text(tmp_path / "a.txt") == "plain text\n"
    records = [{"text": "first"}, {"text": "second", "meta": 1}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_text(tmp_path / "b.jsonl") == "first\n\nsecond"
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"prompt": "no text"}\n')
    with pytest.raises(SlimlmError, match=r'c\.jsonl:2 has no string "text" field'):
        load_text(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text("{not json\n")
    with pytest.raises(SlimlmError, match=r"d\.jsonl:1 is not valid JSON"):
        load_text(tmp_path / "d.jsonl")
    with pytest.raises(SlimlmError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
