"""A client that goes away has its sequence aborted and its KV blocks freed."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL

LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count to one thousand."}],
    "max_tokens": 3000,
    "temperature": 0,
    "ignore_eos": True,
}


def _wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _idle(llm) -> bool:
    engine = llm.engine
    return (
        engine.scheduler.num_running == 0
        and engine.scheduler.num_waiting == 0
        and engine.block_manager.num_free_blocks == engine.budget.num_blocks
    )


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, served_llm):
    engine = served_llm.engine
    async_engine = server.app.state.engine
    assert _wait_until(lambda: _idle(served_llm))
    aborted_before = async_engine.snapshot.requests_aborted
    tokens_before = engine.stats.generated_tokens
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as http:
        with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # held: a dropped iterator would close the connection here
            content_chunks = 0
            while content_chunks < 3:
                line = next(lines)
                content_chunks += '"content"' in line and '"role"' not in line
            held = engine.budget.num_blocks - engine.block_manager.num_free_blocks
            assert engine.scheduler.num_running == 1 and held > 0  # the sequence is alive and holds blocks
        # leaving the `with` closes the connection mid-stream
    assert _wait_until(lambda: _idle(served_llm)), "the abandoned sequence kept its KV blocks"
    assert async_engine.snapshot.requests_aborted == aborted_before + 1
    generated = engine.stats.generated_tokens
    time.sleep(0.5)
    assert engine.stats.generated_tokens == generated  # nothing is decoded for the gone client
    assert generated - tokens_before < LONG["max_tokens"]  # it was cut short, not run to its end


def test_disconnect_while_waiting_for_a_whole_response_aborts(server, served_llm):
    async_engine = server.app.state.engine
    assert _wait_until(lambda: _idle(served_llm))
    aborted_before = async_engine.snapshot.requests_aborted
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/chat/completions",
            json=LONG,
            timeout=httpx.Timeout(60, read=1.5),
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    assert _wait_until(lambda: _idle(served_llm)), "the abandoned request kept running"
    assert async_engine.snapshot.requests_aborted == aborted_before + 1


def test_server_serves_the_next_client_after_a_disconnect(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert r.usage.completion_tokens >= 1
