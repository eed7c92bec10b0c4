"""A finished run can be extended: --resume with a larger --max-steps (issue 22, item 18)."""

from __future__ import annotations

import json

import pytest

from slimlm.cli import main
from tests.train.conftest import qa_records, write_jsonl


def lrs(out) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {e["step"]: e["lr"] for e in lines if "lr" in e}


def test_resume_with_more_steps_continues_on_the_longer_schedule(tiny_model_dir, tmp_path, capsys):
    schedule = "cosine"
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(24))
    common = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--lora-rank", "2", "--batch-size", "2",
              "--schedule", schedule, "--warmup-steps", "1", "--eval-fraction", "0.1"]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "run"), "--max-steps", "3", "--quiet"]) == 0
    assert main([*common, "--output", str(tmp_path / "run"), "--max-steps", "6", "--resume"]) == 0
    err = capsys.readouterr().err
    assert (
        f"run length 3 -> 6 steps: the {schedule} lr schedule is recomputed for 6 steps (warmup stays 1)"
        in err
    )
    extended = lrs(tmp_path / "run")
    assert sorted(extended) == [1, 2, 3, 4, 5, 6]
    # the reference: an uninterrupted 6-step run (torch's LambdaLR from the start) has these lrs from step 4 on
    assert main([*common, "--output", str(tmp_path / "straight"), "--max-steps", "6", "--quiet"]) == 0
    straight = lrs(tmp_path / "straight")
    assert [extended[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)], rel=1e-9)
    assert extended[3] < extended[4]  # the finished 3-step schedule had decayed further
    saved = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert saved["steps"] == 6


def test_resume_before_the_checkpoint_step_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(16))
    common = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--lora-rank", "2", "--batch-size", "2",
              "--output", str(tmp_path / "run"), "--quiet"]  # fmt: skip
    assert main([*common, "--max-steps", "3"]) == 0
    assert main([*common, "--max-steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is at step 3, past this run's 2 steps; give a larger --max-steps" in err and err.count("\n") == 1
    assert (
        main([*common, "--max-steps", "3", "--lr", "1e-3", "--resume"]) == 2
    )  # other settings: still refused
    assert "--lr" in capsys.readouterr().err
