"""`slimlm serve --replicas 1 --guard LIB`: the guard in the Ray Serve ingress, snapping exactly as one
`slimlm serve` does, through the official openai client on a real local Ray instance.

The reference: the offline engine's greedy answer to the same request, snapped by a `Guard` loaded
in this process from the same library and fallbacks (the single-process server's code path), and
sentence-transformers' `encode` for /v1/embeddings. Slow: starting Ray and one replica takes ~40 s.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray Serve replicas need the extra: install slimlm[cluster]")
pytest.importorskip("openai")

from tests.guard.conftest import SHOP, THRESHOLD  # noqa: E402
from tests.guard.test_guard_serve import MAX_TOKENS, _arm, _messages  # noqa: E402

pytestmark = pytest.mark.slow

API_KEY = "cluster-guard-key"
MODEL = "smollm2-135m"
# (question, stage, user): shop questions that snap, an off-topic one per arm, an unknown stage
CASES = [
    ("Can I return a jacket I bought two weeks ago?", "after_sale", "alice"),
    ("How much does shipping cost?", "checkout", "alice"),
    ("Which payment methods do you accept?", "checkout", "bob"),
    ("What is the capital of France?", "checkout", "bob"),
    ("What is the capital of France?", "checkout", "zoe"),
    ("What is the capital of France?", "no-such-stage", "carl"),
]


@pytest.fixture(scope="module")
def cluster(shop_lib):
    from slimlm.cli import build_parser
    from slimlm.cluster.launch import ClusterServer
    from slimlm.server import ServerSettings

    args = build_parser("serve").parse_args(
        ["serve", "--replicas", "1", "--threads", "1", "--port", "0", "--dtype", "float32",
         "--kv-cache-tokens", "2048", "--block-size", "16", "--max-num-seqs", "8",
         "--guard", str(shop_lib), "--guard-threshold", str(THRESHOLD),
         "--guard-fallbacks", str(SHOP / "fallbacks.json")]
    )  # fmt: skip
    settings = ServerSettings(model_name=MODEL, api_key=API_KEY, max_concurrent_requests=16)
    with ClusterServer(args, settings, num_cpus=1) as server:
        yield server


@pytest.fixture(scope="module")
def client(cluster):
    from openai import OpenAI

    with OpenAI(base_url=cluster.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def local_decisions(smollm, shop_lib, embedder):
    """What one `slimlm serve --guard` decides for each case: offline greedy answer + Guard.decide."""
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams
    from slimlm.guard.policy import load_guard

    llm = LLM.from_loaded(smollm, kv_cache_tokens=2048, block_size=16, max_num_seqs=8)
    prompts = [llm.chat_prompt(_messages(q)) for q, _, _ in CASES]
    answers = [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]
    guard = load_guard(str(shop_lib), THRESHOLD, str(SHOP / "fallbacks.json"), embedder=embedder)
    return [guard.decide(a, stage, user) for a, (_, stage, user) in zip(answers, CASES, strict=True)]


def _same_record(got: dict, want: dict) -> None:
    scores = {k for k in ("score", "best_score") if k in want}
    assert {k: v for k, v in got.items() if k not in scores} == {
        k: v for k, v in want.items() if k not in scores
    }
    for k in scores:  # the ingress embeds on its own thread count: float sums in another order
        assert got[k] == pytest.approx(want[k], abs=1e-4)


def test_replicas_snap_every_answer_as_one_server_does(client, cluster, local_decisions):
    import httpx

    sent = Counter()
    for (question, stage, user), want in zip(CASES, local_decisions, strict=True):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=_messages(question), max_tokens=MAX_TOKENS, temperature=0, user=user,
            extra_body={"stage": stage},
        )  # fmt: skip
        assert raw.headers["x-slimlm-replica"]  # served by an engine replica through the ingress
        choice = raw.parse().choices[0]
        assert choice.message.content == want.text
        _same_record(choice.model_extra["guard"], want.record)
        sent[(want.record["action"], want.record["stage"], want.record["arm"])] += 1
    actions = {d.record["action"] for d in local_decisions}
    assert actions == {"matched", "fallback"}, "the cases should cover both snapping and fallbacks"
    assert local_decisions[-1].record.get("requested_stage") == "no-such-stage"

    # streaming: the same approved text in one content chunk, the record on the finish chunk
    question, stage, user = CASES[0]
    text, record = "", None
    for chunk in client.chat.completions.create(
        model=MODEL, messages=_messages(question), max_tokens=MAX_TOKENS, temperature=0, user=user,
        extra_body={"stage": stage}, stream=True,
    ):  # fmt: skip
        text += chunk.choices[0].delta.content or ""
        record = chunk.choices[0].model_extra.get("guard") or record
    assert text == local_decisions[0].text
    _same_record(record, local_decisions[0].record)
    sent[(record["action"], record["stage"], record["arm"])] += 1

    # /metrics: every decision counted per action, stage and arm, in the one ingress
    metrics = httpx.get(
        cluster.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ).text
    for (action, stage, arm), n in sent.items():
        key = f'slimlm_guard_responses_total{{action="{action}",stage="{stage}",arm="{arm}"}}'
        assert re.search(rf"^{re.escape(key)} {n}$", metrics, re.M), (key, n)
    assert re.search(rf"^slimlm_guard_decisions_total {sum(sent.values())}$", metrics, re.M)
    assert {arm for (_, s, arm) in sent if s == "checkout"} == {_arm("bob"), _arm("zoe")} == {0, 1}


def test_embeddings_and_bad_input_behave_as_on_one_server(client, cluster, st_model):
    import httpx

    texts = ["Where is my order?", "Les retours sont gratuits."]
    got = np.array(
        [d.embedding for d in client.embeddings.create(model="all-MiniLM-L6-v2", input=texts).data]
    )
    ref = st_model.encode(texts)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(
        cluster.url + "/v1/chat/completions", headers=headers, timeout=30,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stage": 7},
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "stage"
    r = httpx.post(
        cluster.url + "/v1/chat/completions", headers=headers, timeout=30,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = httpx.post(
        cluster.url + "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"}, timeout=30
    )
    assert r.status_code == 401  # the API key guards the ingress' embeddings route too
