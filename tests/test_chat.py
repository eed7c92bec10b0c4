"""`slimlm chat`: the second turn prefills only the new tokens (plus the last partial block)."""

from __future__ import annotations

import subprocess
import sys

from slimlm.commands.chat import ChatSession
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams


def test_second_turn_reuses_the_history_kv(smollm):
    block = 16
    llm = LLM.from_loaded(smollm, kv_cache_tokens=4096, block_size=block)
    session = ChatSession(llm, SamplingParams(max_tokens=24, temperature=0), system=None)
    first = "".join(session.reply("Name a big city in France."))
    assert first.strip()
    turn1 = session.last_turn
    assert turn1["prefill_tokens"] == turn1["prompt_tokens"]  # nothing cached yet
    "".join(session.reply("And one in Italy?"))
    turn2 = session.last_turn
    new_tokens = turn2["prompt_tokens"] - turn1["prompt_tokens"]
    # Whole blocks of the history come from the prefix cache; at most one partial block is recomputed,
    # plus tokens whose ids differ after re-tokenizing the first reply.
    assert turn2["prefill_tokens"] < new_tokens + block + 8, (turn2, new_tokens)
    assert turn2["prefill_tokens"] < turn2["prompt_tokens"] / 2


def test_reset_starts_a_new_conversation(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=2048)
    session = ChatSession(llm, SamplingParams(max_tokens=4, temperature=0), system="Be brief.")
    "".join(session.reply("Hi"))
    assert len(session.messages) == 3
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_chat_cli_reads_stdin_and_handles_commands():
    script = "Hi there\n/bogus\n/reset\n/exit\n"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "slimlm.cli",
            "chat",
            "--max-tokens",
            "8",
            "--kv-cache-tokens",
            "512",
            "--dtype",
            "float32",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "unknown command /bogus" in result.stderr
    assert "(new conversation)" in result.stderr
    assert result.stdout.count(">>> ") >= 2
