"""Item 2/3 of issue 22: every numeric field is range-checked before the engine (400 naming the field),
a request that cannot fit the whole KV pool is refused, and a hostile request never hurts the streams
of other clients."""

from __future__ import annotations

import json
import math
import threading

import httpx
import pytest

from slimlm.server.validation import CHAT, COMPLETION, INTEGER_FIELDS, pool_tokens
from tests.server.conftest import API_KEY, MODEL, greedy_chat_reference

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
# values a fuzzer (or a careless client) sends; JSON carries big integers exactly
HOSTILE = [2**31, 2**63, 2**64, 2**70, -(2**63) - 1, -(2**70), 1e308, -1e308, -1, 0.5]


def _body(route: str, **fields) -> dict:
    base = {"model": MODEL, "max_tokens": 2, "temperature": 0}
    if route == CHAT_ROUTE:
        base["messages"] = [{"role": "user", "content": "Hi"}]
        if "top_logprobs" in fields:
            base["logprobs"] = True
    else:
        base["prompt"] = "Hi"
    return {**base, **fields}


def _post(http, route, body):
    # json.dumps writes 1e308 and big ints as JSON numbers; allow_nan lets NaN/Infinity through too
    return http.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})


def _cases():
    for route, table in ((CHAT_ROUTE, CHAT), (COMPLETIONS_ROUTE, COMPLETION)):
        for name, limit in table.items():
            for value in HOSTILE:
                if name in INTEGER_FIELDS and isinstance(value, float):
                    continue  # a type error, covered by test_server_bad_input
                if limit.admits(value):
                    continue
                yield route, name, value


def test_every_out_of_range_number_is_a_400_naming_the_field(http):
    failures = []
    for route, name, value in _cases():
        response = _post(http, route, _body(route, **{name: value}))
        error = response.json().get("error", {})
        if response.status_code != 400 or error.get("param") != name or name not in error.get("message", ""):
            failures.append((route, name, value, response.status_code, response.text[:160]))
    assert not failures, failures


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_floats_are_refused(http, value):
    response = _post(http, CHAT_ROUTE, _body(CHAT_ROUTE, temperature=value))
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


def test_values_inside_the_limits_are_served(http):
    """The edges of every declared range are accepted (a schema-driven client may send them)."""
    for route, table in ((CHAT_ROUTE, CHAT), (COMPLETIONS_ROUTE, COMPLETION)):
        for name, limit in table.items():
            if name in ("max_tokens", "max_completion_tokens", "min_tokens", "n", "best_of"):
                continue  # bounded by the context / the other fields, checked elsewhere
            for edge in (limit.minimum, limit.maximum):
                if edge is None or not limit.admits(edge):
                    continue
                value = int(edge) if name in INTEGER_FIELDS else float(edge)
                response = _post(http, route, _body(route, **{name: value}))
                assert response.status_code == 200, (route, name, value, response.text)


def test_stop_token_ids_must_be_token_ids(http, served_llm):
    vocab = served_llm.config.vocab_size
    for bad in (vocab, 2**40, -1):
        response = _post(http, CHAT_ROUTE, _body(CHAT_ROUTE, stop_token_ids=[1, bad], min_tokens=1))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "stop_token_ids[1]"


def test_request_larger_than_the_whole_kv_pool_is_refused(http, served_llm):
    """Used to be a 200 that stopped with "length" hundreds of tokens short of max_tokens."""
    pool = pool_tokens(served_llm)
    assert pool < served_llm.engine.max_model_len  # the pool, not the context, is the bound here
    ids = served_llm.tokenizer.encode("hello " * 300)
    body = _body(COMPLETIONS_ROUTE, prompt=ids, max_tokens=pool - len(ids) + 1, ignore_eos=True)
    response = _post(http, COMPLETIONS_ROUTE, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"holds {pool} tokens" in error["message"] and "--kv-cache-tokens" in error["message"]
    assert error["param"] == "max_tokens"
    # one token less fits: accepted (streamed, and left after the first chunk)
    body["max_tokens"] -= 1
    body["stream"] = True
    with http.stream("POST", COMPLETIONS_ROUTE, json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())


def test_hostile_requests_do_not_abort_other_streams(server, reference_llm):
    """Streams in flight finish with the right text while out-of-range requests arrive (seed 2**64,
    top_k 2**70 used to abort every request in flight)."""
    prompts = ["Describe a sunny day.", "Name three fruits."]
    tokens = 16
    expected = greedy_chat_reference(reference_llm, prompts, tokens)
    results: dict[int, list[str]] = {}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def stream_client(i: int) -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompts[i]}],
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
            }
            with c.stream("POST", CHAT_ROUTE, json=body) as response:
                results[i] = [line for line in response.iter_lines() if line.startswith("data: ")]

    workers = [threading.Thread(target=stream_client, args=(i,)) for i in range(len(prompts))]
    for w in workers:
        w.start()
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
        for fields in ({"seed": 2**64}, {"top_k": 2**70}, {"seed": -(2**70)}, {"n": 2**70}):
            for route in (CHAT_ROUTE, COMPLETIONS_ROUTE):
                response = _post(c, route, _body(route, **fields))
                assert response.status_code == 400, response.text
    for w in workers:
        w.join(timeout=120)
    for i, want in enumerate(expected):
        lines = results[i]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert all("error" not in c for c in chunks), chunks
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want


def test_limits_describe_themselves():
    assert CHAT["top_p"].describe(False) == "a number in (0, 1]"
    assert not CHAT["temperature"].admits(math.inf)
