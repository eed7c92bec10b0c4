"""A second, small server: 429 beyond --max-concurrent-requests, and 500 without a traceback."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.server.conftest import MODEL

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def small_server(smollm):
    from slimlm.engine.llm import LLM
    from slimlm.server import ServerSettings, ServerThread, create_app

    llm = LLM.from_loaded(smollm, kv_cache_tokens=1024)
    with ServerThread(
        create_app(llm, ServerSettings(model_name=MODEL, max_concurrent_requests=1))
    ) as running:
        running.llm = llm
        yield running


def test_over_the_concurrency_limit_gets_429_with_retry_after(small_server):
    openai = pytest.importorskip("openai")
    long = {**BODY, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=small_server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=long) as streaming:
            lines = streaming.iter_lines()  # keep it: dropping the iterator closes the connection
            next(lines)  # the first request holds the only slot
            busy = http.post("/v1/chat/completions", json=BODY)
            assert busy.status_code == 429
            assert busy.headers["Retry-After"] == "1"
            error = busy.json()["error"]
            assert error["type"] == "rate_limit_error" and "busy" in error["message"]
            with openai.OpenAI(base_url=small_server.url + "/v1", api_key="none", max_retries=0) as client:
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(**BODY)
            assert http.get("/health").status_code == 200  # only generation is limited
        # the slot is given back when the server notices the stream's client left
        metrics = small_server.app.state.metrics
        deadline = time.monotonic() + 10
        while metrics.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metrics.in_flight == 0
        assert http.post("/v1/chat/completions", json=BODY).status_code == 200
        metrics = http.get("/metrics").text
    assert "slimlm_requests_rejected_busy_total 2" in metrics


def test_engine_failure_is_500_without_traceback_and_the_server_recovers(small_server, monkeypatch):
    engine = small_server.llm.engine
    real_step = engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("secret-internal-detail")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with httpx.Client(base_url=small_server.url, timeout=60) as http:
        failed = http.post("/v1/chat/completions", json=BODY)
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["type"] == "server_error"
        assert "Traceback" not in failed.text and "secret-internal-detail" not in failed.text
        assert engine.block_manager.num_free_blocks == engine.budget.num_blocks  # the failed request freed
        ok = http.post("/v1/chat/completions", json=BODY)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_engine_failure_mid_stream_ends_with_an_error_event(small_server, monkeypatch):
    engine = small_server.llm.engine
    real_step = engine.step
    calls = {"n": 0}

    def failing_later():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("secret-internal-detail")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_later)
    with httpx.Client(base_url=small_server.url, timeout=60) as http:
        body = {**BODY, "max_tokens": 20, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "server_error" and "secret" not in error["message"]
    assert engine.block_manager.num_free_blocks == engine.budget.num_blocks
