"""KV pool sizing and allocation failures from the command line (issue 22, item 6)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from slimlm.cli import main
from slimlm.engine.memory import free_memory_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_a_pool_larger_than_free_memory_is_one_line(tiny_model_dir, capsys):
    for flag, value in (("--kv-cache-tokens", "1000000000000"), ("--kv-cache-bytes", "100TiB")):
        assert main(["generate", "hi", "--model", str(tiny_model_dir), "--quiet", flag, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "internal error" not in err
        assert (
            "the KV pool needs" in err and "is free on cpu" in err and err.rstrip().endswith(f"lower {flag}")
        )


def test_an_allocation_that_fails_says_what_was_asked_and_what_to_lower(tiny_model_dir):
    """Under a process memory limit (ulimit -v) the allocation itself fails, though memory is free."""
    pool = 4 * 2**30
    if free_memory_bytes(__import__("torch").device("cpu")) < pool + 2**30:
        pytest.skip("needs 5 GiB free for the limit, not the machine, to be what refuses the pool")

    def limit():  # about what torch needs to start, well under the pool
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    done = subprocess.run([sys.executable, "-m", "slimlm.cli", "generate", "hi", "--model", str(tiny_model_dir),
                           "--quiet", "--kv-cache-bytes", str(pool)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=limit)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "could not be allocated" in done.stderr, done.stderr
    assert "the KV pool needs 4.00 GiB" in done.stderr and done.stderr.rstrip().endswith(
        "lower --kv-cache-bytes"
    )


def test_one_shot_commands_size_the_default_pool_to_what_they_run(tiny_model_dir, capsys):
    """generate: one full-length sequence per prompt, not 0.8 x free memory (capped at 64 sequences)."""
    base = ["generate", "--model", str(tiny_model_dir), "--max-tokens", "1"]
    assert main([*base[:1], "hi", *base[1:]]) == 0
    assert "capped at 1 seqs x 256 tokens" in capsys.readouterr().err
    assert main([*base[:1], "hi", "ho", *base[1:]]) == 0
    assert "KV pool 128.00 KiB (bf16): 512 tokens" in capsys.readouterr().err  # 2 x 256 tokens


def test_chat_pool_holds_one_conversation(tiny_model_dir):
    done = subprocess.run([sys.executable, "-m", "slimlm.cli", "chat", "--model", str(tiny_model_dir),
                           "--max-tokens", "1"], input="/exit\n", capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "capped at 1 seqs x 256 tokens" in done.stderr
