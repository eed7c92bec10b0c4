"""Binary or truncated inputs end in one line naming the file, never a traceback (issue 22, item 8)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimlm.cli import main
from tests.train.conftest import qa_records, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
BINARY = b"\xff" + bytes(range(256)) * 8 + b"\n\xff\xfe\x00\x81 more\n"


def run_cli(args: list, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "slimlm.cli", *args], input=stdin, capture_output=True,
                          timeout=180, env=env)  # fmt: skip


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "internal error" not in lines[0] and "Traceback" not in stderr, stderr
    return lines[0]


def test_chat_survives_binary_lines_and_keeps_the_conversation(tiny_model_dir):
    script = b"Hi\n" + BINARY + b"\nHello again\n/exit\n"
    done = run_cli(["chat", "--model", str(tiny_model_dir), "--max-tokens", "3", "--kv-cache-tokens", "512",
                    "--stats"], stdin=script)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "is not UTF-8 text" in err and "internal error" not in err
    turns = [line for line in err.splitlines() if line.startswith("[prompt ")]
    assert len(turns) == 2, err  # both text turns answered
    # the second turn's prompt holds the first exchange: the conversation was not lost
    first, second = (int(t.split()[1]) for t in turns)
    assert second > first + len("Hello again")


def test_a_failed_turn_leaves_the_history_unchanged(tiny_model_dir):
    from slimlm.commands.chat import ChatSession
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams
    from slimlm.errors import SlimlmError

    llm = LLM(str(tiny_model_dir), dtype="float32", progress=False, kv_cache_tokens=64, block_size=16)
    session = ChatSession(llm, SamplingParams(max_tokens=2, temperature=0), system=None)
    "".join(session.reply("Hi"))
    history = list(session.messages)
    with pytest.raises(SlimlmError, match="KV"):
        "".join(session.reply("x" * 200))  # longer than the whole pool
    assert session.messages == history
    "".join(session.reply("Hi again"))
    assert len(session.messages) == len(history) + 2


def test_generate_refuses_binary_prompts_in_one_line(tiny_model_dir, tmp_path):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(BINARY)
    model = ["--model", str(tiny_model_dir), "--max-tokens", "2"]
    cases = [
        (
            ["generate", "--prompts-file", str(binary), *model],
            None,
            f"--prompts-file {binary} is not UTF-8 text",
        ),
        (["generate", *model], BINARY, "standard input is not UTF-8 text"),
        (["generate", b"caf\xe9", *model], None, "prompt 1 is not UTF-8 text (byte 0xe9"),
        (["generate", "hi", "--chat", "--system", b"\xff", *model], None, "--system is not UTF-8 text"),
    ]
    for args, stdin, message in cases:
        done = run_cli(args, stdin)
        assert done.returncode == 2 and message in one_error_line(done.stderr.decode()), done.stderr


def test_truncated_checkpoint_files_on_resume(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(16))
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
            "--max-steps", "2", "--save-every", "1", "--lora-rank", "2", "--quiet", "--batch-size", "4"]  # fmt: skip
    assert main(args) == 0
    step1 = tmp_path / "run" / "checkpoints" / "step-000001"
    for name, damage in [("trainable.safetensors", "half"), ("scheduler.pt", "half"),
                         ("trainer_state.json", "binary"), ("optimizer.pt", "half")]:  # fmt: skip
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(step1, broken)
        target = broken / name
        content = target.read_bytes()
        target.write_bytes(content[: len(content) // 2] if damage == "half" else BINARY)
        assert main([*args, "--resume", str(broken)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "internal error" not in err, err
        assert str(broken) in err and ("corrupt" in err or "unreadable" in err), err


def test_binary_config_and_adapter_files(tiny_model_dir, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model / "config.json").write_bytes(BINARY)
    assert main(["generate", "hi", "--model", str(model), "--quiet"]) == 2
    assert "config.json is not text" in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(BINARY)
    assert main(["merge", str(adapter), "--model", str(tiny_model_dir), "--output", str(tmp_path / "m")]) == 2
    assert "adapter_config.json is not text" in capsys.readouterr().err
    calib = tmp_path / "calib.txt"
    calib.write_bytes(BINARY)
    assert main(["quantize", "--model", str(tiny_model_dir), "--calib-file", str(calib), "--group-size", "32",
                 "--out", str(tmp_path / "q"), "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--calib-file {calib} is not UTF-8 text" in err
