"""/metrics (Prometheus text), /health, the OpenAPI schema and the chat page."""

from __future__ import annotations

import re

from tests.server.conftest import MODEL


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_requests_tokens_kv_and_queue(http, served_llm):
    before = _samples(http.get("/metrics").text)
    r = http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "temperature": 0,
        },
    ).json()
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "slimlm_requests_total",
        "slimlm_generation_tokens_total",
        "slimlm_prompt_tokens_total",
        "slimlm_kv_cache_usage_ratio",
        "slimlm_num_requests_waiting",
        "slimlm_num_requests_running",
    ):
        assert f"# TYPE {name} " in text
    assert all(
        re.fullmatch(r"(# (HELP|TYPE) .*|slimlm_\w+(\{[^}]*\})? [-+.\deE]+|[^ ]+\{le=\"[^\"]+\"\} \d+)", line)
        for line in text.splitlines()
    ), "not Prometheus text format"
    after = _samples(text)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew('slimlm_requests_total{endpoint="chat"}') == 1
    assert grew("slimlm_prompt_tokens_total") == r["usage"]["prompt_tokens"]
    assert grew("slimlm_generation_tokens_total") == r["usage"]["completion_tokens"]
    assert grew('slimlm_http_responses_total{path="/v1/chat/completions",code="200"}') == 1
    assert grew("slimlm_time_to_first_token_seconds_count") == 1
    assert after["slimlm_kv_cache_blocks"] == served_llm.engine.budget.num_blocks
    assert 0 <= after["slimlm_kv_cache_usage_ratio"] <= 1
    assert after["slimlm_num_requests_waiting"] == 0


def test_health_openapi_and_chat_page(http):
    assert http.get("/health").json() == {"status": "ok"}
    schema = http.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"):
        assert path in schema["paths"]
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {
        "messages",
        "top_k",
        "min_p",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "ignore_eos",
        "seed",
    } <= set(props)
    for path in ("/", "/ui"):
        page = http.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="new-chat"' in page.text and "/v1/chat/completions" in page.text
