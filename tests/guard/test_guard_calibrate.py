"""`slimlm guard calibrate` on the shop scenario: its table equals precision / recall / fallback rate
computed here from sentence-transformers' vectors by brute force, and it recommends a usable threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimlm.cli import main
from tests.guard.conftest import SHOP
from tests.guard.test_guard_library import _exact_best


def test_calibrate_reports_precision_recall_and_fallback_rate(tmp_path, shop_lib, st_model, capsys):
    out_json, plot = tmp_path / "cal.json", tmp_path / "cal.png"
    code = main(
        [
            "guard",
            "calibrate",
            str(shop_lib),
            str(SHOP / "labeled.jsonl"),
            "--json",
            str(out_json),
            "--plot",
            str(plot),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out_json.read_text())
    labeled = [json.loads(line) for line in (SHOP / "labeled.jsonl").read_text().splitlines()]
    ids, scores = _exact_best(st_model, [x["answer"] for x in labeled])
    expected = np.array([x["expected"] for x in labeled], dtype=object)
    for row in result["rows"]:
        snapped = scores >= row["threshold"]
        right = snapped & (np.array(ids, dtype=object) == expected)
        assert row["fallback_rate"] == pytest.approx(1 - snapped.mean())
        assert row["precision"] == pytest.approx(right.sum() / snapped.sum() if snapped.any() else 1.0)
        assert row["recall"] == pytest.approx(right.sum() / (expected != "fallback").sum())
    best = next(r for r in result["rows"] if r["threshold"] == result["recommended"])
    # the scenario works: most answers snap to the right reply, off-topic ones fall back
    assert best["precision"] >= 0.95 and best["recall"] >= 0.9 and best["fallback_rate"] < 0.35
    assert f"recommended threshold: {result['recommended']:g}" in printed
    assert "precision" in printed and "fallback" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_bad_labels(tmp_path, shop_lib, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "hi", "expected": "no-such-reply"}\n')
    assert main(["guard", "calibrate", str(shop_lib), str(bad), "--no-plot"]) == 2
    assert "'expected' must be a reply id of the library or \"fallback\"" in capsys.readouterr().err
    bad.write_text("")
    assert main(["guard", "calibrate", str(shop_lib), str(bad), "--no-plot"]) == 2
    assert "has no lines" in capsys.readouterr().err
