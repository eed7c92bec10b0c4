"""Bad requests get the right 4xx in OpenAI's error shape, and the server keeps serving everyone else."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, greedy_chat_reference

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields}


# (route, body, status, param, words the message must hold)
CASES = [
    (CHAT, b'{"model": "smollm2-135m", "messages": [', 400, None, "not valid JSON"),
    (CHAT, b"[1, 2, 3]", 400, None, "JSON object"),
    (CHAT, chat(foo=1), 400, "foo", "Unrecognized request argument supplied: foo"),
    (CHAT, chat(temperature="hot"), 400, "temperature", "temperature"),
    (CHAT, chat(max_tokens="10"), 400, "max_tokens", "max_tokens"),
    (CHAT, chat(stream="yes"), 400, "stream", "stream"),
    (CHAT, {"model": MODEL, "max_tokens": 2}, 400, "messages", "required"),
    (CHAT, chat(messages="hello"), 400, "messages", "messages"),
    (CHAT, chat(messages=[]), 400, "messages", "at least one message"),
    (CHAT, chat(messages=[{"content": "x"}]), 400, "messages[0].role", "required"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", "wizard"),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", "string"),
    (
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content",
        "image_url",
    ),
    (CHAT, chat(max_tokens=-5), 400, "max_tokens", "max_tokens=-5"),
    (CHAT, chat(max_tokens=0), 400, "max_tokens", "max_tokens=0"),
    (CHAT, chat(temperature=-1), 400, "temperature", "temperature=-1"),
    (CHAT, chat(top_p=0), 400, "top_p", "top_p=0"),
    (CHAT, chat(top_k=-7), 400, "top_k", "top_k=-7"),
    (CHAT, chat(min_tokens=5), 400, "min_tokens", "min_tokens=5"),
    (CHAT, chat(n=0), 400, "n", "'n'"),
    (CHAT, chat(n=1000), 400, "n", "'n'"),
    (CHAT, chat(stop=5), 400, "stop", "stop"),
    (CHAT, chat(stop=[""]), 400, "stop", "stop"),
    (CHAT, chat(logit_bias={"1": 5}), 400, "logit_bias", "not supported"),
    (CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", "stream"),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs", "logprobs"),
    (CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type", "xml"),
    (CHAT, chat(max_tokens=9000), 400, "messages", "maximum context length"),
    (
        CHAT,
        chat(messages=[{"role": "user", "content": "hello " * 9000}]),
        400,
        "messages",
        "maximum context length",
    ),
    (CHAT, chat(messages=[{"role": "user", "content": "hello " * 5000}], max_tokens=5), 400, None, "KV"),
    (CHAT, chat(model="gpt-17"), 404, "model", "gpt-17"),
    (COMPLETIONS, completion(model="gpt-17"), 404, "model", "gpt-17"),
    (COMPLETIONS, completion(prompt=""), 400, "prompt", "empty"),
    (COMPLETIONS, completion(prompt=[]), 400, "prompt", "empty"),
    (COMPLETIONS, completion(prompt=[1, "a"]), 400, "prompt", "token ids"),
    (COMPLETIONS, completion(prompt=[10**9]), 400, "prompt", "ids in"),
    (COMPLETIONS, completion(suffix="x"), 400, "suffix", "suffix"),
    (COMPLETIONS, completion(logprobs=50), 400, "logprobs", "logprobs=50"),
    (COMPLETIONS, {"prompt": "Hi"}, 400, "model", "required"),
]


def _check_error(response: httpx.Response, status: int, param: str | None, words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert words in body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize(
    ("route", "body", "status", "param", "words"),
    CASES,
    ids=[f"{i}-{c[0].rsplit('/', 1)[-1]}-{c[2]}" for i, c in enumerate(CASES)],
)
def test_bad_request_gets_openai_error(http, route, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(route, content=content, headers={"Content-Type": "application/json"})
    error = _check_error(response, status, param, words)
    assert error["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413_with_or_without_content_length(http):
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 300_000}])).encode()
    _check_error(
        http.post(CHAT, content=big, headers={"Content-Type": "application/json"}), 413, None, "limit"
    )

    def chunked():  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    _check_error(
        http.post(CHAT, content=chunked(), headers={"Content-Type": "application/json"}), 413, None, "limit"
    )


def test_unknown_route_and_wrong_method(http):
    _check_error(http.get("/v1/engines"), 404, None, "/v1/engines")
    _check_error(http.get(CHAT), 405, None, "GET")


def test_api_key_is_enforced_everywhere_but_health_and_the_page(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        # open: the probe, the page and its icon, and the API description (no data in any of them)
        for path in ("/health", "/", "/favicon.ico", "/openapi.json", "/docs"):
            assert anonymous.get(path).status_code == 200, path
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", CHAT),
            ("POST", COMPLETIONS),
            ("GET", "/metrics"),
            ("GET", "/v1/models/" + MODEL),
        ):
            response = anonymous.request(method, path, json=chat() if method == "POST" else None)
            error = _check_error(response, 401, None, "API key")
            assert error["code"] == "invalid_api_key"
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer not-the-key"})
        assert _check_error(wrong, 401, None, "incorrect")["type"] == "authentication_error"


def test_openai_client_raises_its_typed_errors(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad_key:
        with pytest.raises(openai.AuthenticationError):
            bad_key.models.list()
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=-1)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(model="nope", messages=USER, max_tokens=1)


def test_bad_requests_do_not_disturb_a_running_stream(http, server, reference_llm):
    """Another client's stream runs to the right answer while a barrage of bad requests arrives."""
    prompt, tokens = "Describe a sunny day.", 12
    expected = greedy_chat_reference(reference_llm, [prompt], tokens)[0]
    result: dict = {}

    def stream_client() -> None:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
        ) as c:
            body = chat(
                messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0, stream=True
            )
            with c.stream("POST", CHAT, json=body) as response:
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        result["lines"] = lines

    worker = threading.Thread(target=stream_client)
    worker.start()
    for route, body, status, _param, _words in CASES[:12] * 2:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert (
            http.post(route, content=content, headers={"Content-Type": "application/json"}).status_code
            == status
        )
    worker.join(timeout=120)
    lines = result["lines"]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected
