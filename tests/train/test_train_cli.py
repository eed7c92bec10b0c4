"""`slimlm train` and `slimlm merge` from the command line: results on success, one-line errors otherwise."""

from __future__ import annotations

import json

import torch

from slimlm.cli import main
from slimlm.loading import load
from tests.train.conftest import qa_records, write_jsonl


def test_train_then_merge_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(20))
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps", "3",
            "--lora-rank", "4", "--lora-targets", "q_proj,v_proj", "--optim", "adamw4bit", "--lr", "1e-2",
            "--gradient-checkpointing", "--eval-fraction", "0.2"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "planner predicts a peak of" in captured.err and "measured tensor peak" in captured.err
    assert "eval loss" in captured.out and f"saved the adapter (PEFT format) to {out}" in captured.out
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert sum(1 for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line) == 3

    assert main(args) == 2  # the same output again: refused
    assert "not empty" in capsys.readouterr().err

    assert main(["merge", str(out), "--output", str(tmp_path / "merged"), "--quiet"]) == 0
    merged = load(str(tmp_path / "merged"), progress=False)
    assert torch.isfinite(merged.model.forward_dense(torch.tensor([[1, 5, 9]]))).all()


def test_bad_input_gives_one_line_errors(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversation": [{"input": "a", "output": "b"}]}\n{"conversation": [{"input": "a"}]}\n')
    common = ["train", "--model", str(tiny_model_dir), "--quiet"]
    cases = [
        (
            ["--data", str(bad), "--output", str(tmp_path / "a")],
            "bad.jsonl:2: conversation turn 0 needs a string 'output'",
        ),
        (
            ["--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "b")],
            "missing.jsonl does not exist",
        ),
        (
            ["--data", str(bad), "--output", str(tmp_path / "c"), "--lora-rank", "0"],
            "LoRA rank must be a positive",
        ),
        (["--data", str(bad), "--output", str(tmp_path / "d"), "--resume", "--overwrite"], "contradict"),
    ]
    for extra, message in cases:
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not any((tmp_path / name).exists() for name in "abcd")
