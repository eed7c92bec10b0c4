"""A real `slimlm serve --guard` subprocess on loopback, driven by the official openai client.

The reference for every snapped answer: the same greedy answer computed offline by slimlm's engine,
embedded by sentence-transformers itself and compared by brute-force cosine with every approved text.
"""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import pytest

from slimlm.cli import main
from tests.guard.conftest import API_KEY, QUERY_SCORE_TOL, SHOP, THRESHOLD

MAX_TOKENS = 40
SYSTEM = (
    "You are the support assistant of Northwind Outfitters, an outdoor gear shop. Facts: unworn items with "
    "tags can be returned within 30 days of delivery for a full refund. Standard shipping is free on orders "
    "over $50. We accept Visa, Mastercard, PayPal and Apple Pay. Answer in one short sentence."
)
SHOP_QUESTIONS = [
    "Can I return a jacket I bought two weeks ago?",
    "How much does shipping cost?",
    "Which payment methods do you accept?",
]
# the dialogue stage each question is asked in: a reply with a stage matches only in that stage
SHOP_STAGES = ["after_sale", "checkout", "checkout"]
FALLBACKS = json.loads((SHOP / "fallbacks.json").read_text())


def _arm(user: str) -> int:
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") % 2


def _messages(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def reference_answers(smollm):
    """Greedy answers of the offline engine (the raw text the server must never send)."""
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams

    llm = LLM.from_loaded(smollm, kv_cache_tokens=2048, block_size=16, max_num_seqs=8)
    prompts = [llm.chat_prompt(_messages(q)) for q in [*SHOP_QUESTIONS, "What is the capital of France?"]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return [o.text for o in outs]


def _reference_snap(st_model, answer: str, stage: str | None = None) -> tuple[str | None, float]:
    texts, owners = [], []
    for line in (SHOP / "replies.jsonl").read_text().splitlines():
        r = json.loads(line)
        if stage is not None and r.get("stage") not in (None, stage):
            continue
        for t in [r["text"], *r.get("examples", [])]:
            texts.append(t)
            owners.append(r["id"])
    v = st_model.encode([answer, *texts], normalize_embeddings=True)
    sims = v[1:] @ v[0]
    best = int(np.argmax(sims))
    return (owners[best] if sims[best] >= THRESHOLD else None), float(sims[best])


def _replies() -> dict[str, str]:
    return {
        json.loads(x)["id"]: json.loads(x)["text"] for x in (SHOP / "replies.jsonl").read_text().splitlines()
    }


def test_answers_snap_to_the_approved_reply_the_reference_picks(client, reference_answers, st_model):
    replies = _replies()
    matched = 0
    for question, stage, raw in zip(SHOP_QUESTIONS, SHOP_STAGES, reference_answers, strict=False):
        resp = client.chat.completions.create(
            model="smollm2-135m",
            messages=_messages(question),
            max_tokens=MAX_TOKENS,
            temperature=0,
            user="alice",
            extra_body={"stage": stage},
        )
        choice = resp.choices[0]
        record = choice.model_extra["guard"]
        want_id, want_score = _reference_snap(st_model, raw, stage)
        assert choice.message.content != raw  # the raw answer never reaches the client
        assert (record["stage"], record["arm"]) == (stage, _arm("alice"))
        if want_id is None:
            assert (
                record["action"] == "fallback" and choice.message.content == FALLBACKS[stage][_arm("alice")]
            )
            assert record["best_score"] == pytest.approx(want_score, abs=QUERY_SCORE_TOL)
        else:
            matched += 1
            assert record["action"] == "matched" and record["id"] == want_id
            assert choice.message.content == replies[want_id]
            assert record["score"] == pytest.approx(want_score, abs=QUERY_SCORE_TOL)
    assert matched >= 2, "the shop questions should mostly snap to approved replies"


def test_off_topic_question_gets_the_stage_fallback(client, reference_answers, st_model):
    assert _reference_snap(st_model, reference_answers[-1], "checkout")[0] is None
    for user in ("bob", "zoe", "carl"):
        resp = client.chat.completions.create(
            model="smollm2-135m",
            messages=_messages("What is the capital of France?"),
            max_tokens=MAX_TOKENS,
            temperature=0,
            user=user,
            extra_body={"stage": "checkout"},
        )
        record = resp.choices[0].model_extra["guard"]
        assert resp.choices[0].message.content == FALLBACKS["checkout"][_arm(user)]
        assert record["action"] == "fallback" and record["reason"] == "below threshold"
        assert (record["stage"], record["arm"]) == ("checkout", _arm(user))


def test_unknown_stage_uses_the_universal_fallback_and_says_so(client):
    resp = client.chat.completions.create(
        model="smollm2-135m",
        messages=_messages("What is the capital of France?"),
        max_tokens=MAX_TOKENS,
        temperature=0,
        user="dana",
        extra_body={"stage": "haggling"},
    )
    record = resp.choices[0].model_extra["guard"]
    assert resp.choices[0].message.content == FALLBACKS["default"][_arm("dana")]
    assert record["stage"] == "default" and record["requested_stage"] == "haggling"
    assert "unknown stage 'haggling'" in record["note"]


def test_streaming_clients_receive_the_final_approved_text(client):
    kwargs = dict(
        model="smollm2-135m", messages=_messages(SHOP_QUESTIONS[0]), max_tokens=MAX_TOKENS, temperature=0
    )
    whole = client.chat.completions.create(user="erin", **kwargs)
    chunks = list(
        client.chat.completions.create(
            user="erin", stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == [whole.choices[0].message.content]  # one chunk: the approved text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert (
        len(finish) == 1
        and finish[0].choices[0].model_extra["guard"] == whole.choices[0].model_extra["guard"]
    )
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.id == chunks[0].id for c in chunks)


def test_legacy_completions_are_guarded_too(client):
    resp = client.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0, n=2, user="gus"
    )
    allowed = set(_replies().values()) | set(FALLBACKS["default"])
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert choice.text in allowed and choice.model_extra["guard"]["action"] in ("matched", "fallback")


def _counter(http, action: str, stage: str, arm: int) -> float:
    text = http.get("/metrics").text
    key = f'slimlm_guard_responses_total{{action="{action}",stage="{stage}",arm="{arm}"}} '
    return next((float(line[len(key) :]) for line in text.splitlines() if line.startswith(key)), 0.0)


def test_metrics_count_fallbacks_per_stage_and_arm(client, http):
    before = _counter(http, "fallback", "greeting", _arm("frank"))
    client.chat.completions.create(
        model="smollm2-135m",
        messages=_messages("What is the capital of France?"),
        max_tokens=MAX_TOKENS,
        temperature=0,
        user="frank",
        extra_body={"stage": "greeting"},
    )
    assert _counter(http, "fallback", "greeting", _arm("frank")) == before + 1
    assert "slimlm_requests_total" in http.get("/metrics").text  # the server's own metrics are still there


def test_embeddings_equal_sentence_transformers(client, http, st_model):
    texts = ["Where is my order?", "Les retours sont gratuits.", "x" * 3000]
    ref = st_model.encode(texts)
    resp = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in resp.data])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert got.shape == (3, 384) and cos.min() >= 0.9999
    tokens = int(st_model.tokenize(texts)["attention_mask"].sum())
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == tokens and resp.model == "all-MiniLM-L6-v2"
    one = http.post(
        "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": texts[0], "encoding_format": "float"}
    )
    body = one.json()
    assert one.status_code == 200 and len(body["data"]) == 1 and body["data"][0]["index"] == 0
    v = np.array(body["data"][0]["embedding"])
    assert float(v @ ref[0] / np.linalg.norm(v) / np.linalg.norm(ref[0])) >= 0.9999
    b64 = http.post(
        "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [texts[0]], "encoding_format": "base64"}
    )
    decoded = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, v.astype(np.float32))


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": []}, 400, "input"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": ["ok", ""]}, 400, "input"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": [1, 2, 3]}, 400, "input"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "a", "dimensions": 64}, 400, "dimensions"),
        (
            "/v1/embeddings",
            {"model": "all-MiniLM-L6-v2", "input": "a", "encoding_format": "int8"},
            400,
            "encoding_format",
        ),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "a"}, 404, "model"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "a", "foo": 1}, 400, "foo"),
        (
            "/v1/chat/completions",
            {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "stage": 3},
            400,
            "stage",
        ),
        (
            "/v1/chat/completions",
            {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
            400,
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": "smollm2-135m", "messages": "hi", "stage": "greeting"},
            400,
            "messages",
        ),
        ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "echo": True}, 400, "echo"),
    ],
)
def test_bad_requests_get_400_with_the_field_named(http, path, body, status, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_guard_routes_need_the_api_key(guard_server):
    import httpx

    r = httpx.post(
        guard_server + "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "a"}, timeout=30
    )
    assert r.status_code == 401
    r = httpx.post(
        guard_server + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_serve_guard_flags_fail_before_loading_the_model(tmp_path, shop_lib, capsys):
    assert main(["serve", "--guard-threshold", "0.5"]) == 2
    assert "--guard-threshold needs --guard LIB" in capsys.readouterr().err
    assert main(["serve", "--guard-cache", "8"]) == 2
    assert "--guard-cache needs --guard LIB" in capsys.readouterr().err
    assert main(["serve", "--guard", str(shop_lib), "--guard-cache", "-1"]) == 2
    assert "--guard-cache is a number of answers (0 turns it off), got -1" in capsys.readouterr().err
    assert main(["serve", "--guard", str(tmp_path)]) == 2
    assert "is not a guard library" in capsys.readouterr().err
    bad = tmp_path / "fb.json"
    bad.write_text('{"greeting": ["hi"]}')
    assert main(["serve", "--guard", str(shop_lib), "--guard-fallbacks", str(bad)]) == 2
    assert "universal fallback 'default' is missing" in capsys.readouterr().err
    # with --replicas the same one-line errors, before any Ray process starts
    assert main(["serve", "--replicas", "1", "--guard", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a guard library" in err and len(err.splitlines()) == 1
    assert main(["serve", "--replicas", "1", "--guard", str(shop_lib), "--guard-fallbacks", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "universal fallback 'default' is missing" in err and len(err.splitlines()) == 1
    ray = pytest.importorskip("ray", reason="install slimlm[cluster]")
    assert not ray.is_initialized()


def test_embeddings_alone_without_a_guard(smollm, embedder, st_model):
    """`serve --embeddings`: the route without snapping; chat answers pass through unguarded."""
    import httpx

    from slimlm.engine.llm import LLM
    from slimlm.server import ServerSettings, ServerThread, create_app
    from slimlm.server.guard_route import install_guard

    llm = LLM.from_loaded(smollm, kv_cache_tokens=512, block_size=16, max_num_seqs=4)
    app = create_app(llm, ServerSettings(model_name="smollm2-135m"))
    install_guard(app, None, embedder)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "Where is my parcel?"})
        v = np.array(r.json()["data"][0]["embedding"])
        ref = st_model.encode(["Where is my parcel?"])[0]
        assert float(v @ ref / np.linalg.norm(v) / np.linalg.norm(ref)) >= 0.9999
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        ).json()
        assert "guard" not in chat["choices"][0]
        assert "slimlm_guard" not in http.get("/metrics").text
