"""Bad flags end in one line on stderr (`error: ...` and where the usage is), never argparse's usage dump."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def slimlm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "slimlm.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, input=stdin)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message", "help_of"),
    [
        (["generate", "hi", "--bogus"], "unrecognized arguments: --bogus", "slimlm generate"),
        (
            ["generate", "--max-tokens", "x"],
            "argument --max-tokens: invalid int value: 'x'",
            "slimlm generate",
        ),
        (["merge"], "the following arguments are required: adapter, --output", "slimlm merge"),
        (
            ["quantize", "--method", "zzz", "--out", "x"],
            "argument --method: invalid choice: 'zzz'",
            "slimlm quantize",
        ),
        (["train", "--data", "a.jsonl"], "required: --output", "slimlm train"),
        (["plan", "--no-such-flag"], "unrecognized arguments: --no-such-flag", "slimlm plan"),
        (["eval", "ppl", "--bogus"], "unrecognized arguments: --bogus", "slimlm eval"),
        (["serve", "--port", "eighty"], "argument --port: invalid int value", "slimlm serve"),
        (["nosuchcommand"], "invalid choice: 'nosuchcommand'", "slimlm"),
    ],
)
def test_usage_error_is_one_line(args, message, help_of):
    done = slimlm(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
    assert done.stderr.rstrip().endswith(f"see '{help_of} --help'")
    assert "usage:" not in done.stderr


def test_no_blank_line_before_an_error_after_loading(tiny_model_dir):
    """The loader's progress bar used to leave an empty line on a pipe, right before the error."""
    done = slimlm("generate", "hi there, how are you?", "--model", str(tiny_model_dir), "--max-tokens", "2",
                  "--kv-cache-tokens", "4", "--block-size", "2")  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert "" not in lines, done.stderr
    assert lines[-1].startswith("error: the prompt needs") and lines[0].startswith("weights "), done.stderr


def test_help_still_prints_the_usage():
    done = slimlm("generate", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: slimlm generate")
