"""Without a Ray cluster: the ingress tokenizes like the engine, and the affinity table recognises a
conversation's next turn but not another conversation that shares only the system prompt."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="install slimlm[cluster]")

from slimlm.cluster.prompt_side import load_prompt_side  # noqa: E402
from slimlm.cluster.router import AffinityTable, block_hashes  # noqa: E402


@pytest.fixture(scope="module")
def prompt_side():
    return load_prompt_side(None, None)


def test_prompt_side_tokenizes_like_the_loaded_model(prompt_side, smollm):
    from slimlm.engine.llm import LLM

    llm = LLM.from_loaded(smollm, kv_cache_tokens=256, block_size=16)
    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    assert prompt_side.chat_prompt(messages) == llm.chat_prompt(messages)
    assert prompt_side.encode_prompt("plain text") == llm.encode_prompt("plain text")
    assert prompt_side.engine.max_model_len == llm.engine.max_model_len
    assert prompt_side.loaded.generation_config == smollm.generation_config


def test_next_turn_finds_its_replica_and_a_new_conversation_does_not(prompt_side):
    turn1 = [{"role": "user", "content": "Write one sentence about the sea, then one about the mountains."}]
    turn2 = turn1 + [
        {"role": "assistant", "content": "The sea is wide."},
        {"role": "user", "content": "More."},
    ]
    other = [{"role": "user", "content": "Write one sentence about the desert, then one about rivers."}]
    ids1, ids2, ids_other = (prompt_side.chat_prompt(m) for m in (turn1, turn2, other))
    assert ids2[: len(ids1)] == ids1 and ids_other[:16] == ids1[:16]  # a shared system prompt block
    table = AffinityTable()
    table.remember(block_hashes(ids1, 16), "replica-a")
    assert table.lookup(block_hashes(ids2, 16), {"replica-a", "replica-b"}) == "replica-a"
    assert table.lookup(block_hashes(ids_other, 16), {"replica-a", "replica-b"}) is None
    assert table.lookup(block_hashes(ids2, 16), {"replica-b"}) is None  # its replica is gone
    table.forget({"replica-a"})
    assert table.lookup(block_hashes(ids2, 16), {"replica-a"}) is None
