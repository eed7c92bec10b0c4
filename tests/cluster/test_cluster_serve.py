"""Two engine replicas on a local Ray Serve instance behind one OpenAI endpoint (SmolLM2, 1 thread each).

Ray is kept small for the shared 2-core machine: 2 CPUs, no dashboard, a 2048-token KV pool per replica.
Slow: starting Ray and loading two replicas takes ~90 s of the module's ~230 s on the busy machine.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray", reason="Ray Serve replicas need the extra: install slimlm[cluster]")
pytest.importorskip("openai")

from tests.server.conftest import greedy_chat_reference  # noqa: E402

pytestmark = pytest.mark.slow

API_KEY = "cluster-key"
MODEL = "smollm2-135m"
HEADER = "x-slimlm-replica"
BLOCK = 16


@pytest.fixture(scope="module")
def cluster():
    from slimlm.cli import build_parser
    from slimlm.cluster.launch import ClusterServer
    from slimlm.server import ServerSettings

    args = build_parser("serve").parse_args(
        ["serve", "--replicas", "2", "--threads", "1", "--port", "0", "--dtype", "float32",
         "--kv-cache-tokens", "2048", "--block-size", str(BLOCK), "--max-num-seqs", "16"]
    )  # fmt: skip
    settings = ServerSettings(model_name=MODEL, api_key=API_KEY, max_concurrent_requests=32)
    with ClusterServer(args, settings, num_cpus=2) as server:
        yield server


@pytest.fixture
def client(cluster):
    from openai import OpenAI

    with OpenAI(base_url=cluster.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference_llm(smollm):
    from slimlm.engine.llm import LLM

    return LLM.from_loaded(smollm, kv_cache_tokens=2048, block_size=BLOCK, max_num_seqs=16)


def metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    return float(re.search(rf"^slimlm_{name} (\S+)$", text, re.M).group(1))


def stream_chat(client, messages, max_tokens=12, **extra) -> tuple[str, str, str | None]:
    """(replica, text, finish reason) of one streamed chat completion, through the official client."""
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True, **extra
    ) as response:
        replica = response.headers[HEADER]
        text, finish = "", None
        for chunk in response.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
    return replica, text, finish


def test_streams_come_from_both_replicas_and_match_one_engine(client, reference_llm):
    prompts = [f"Name a fruit that is {c}." for c in ("red", "yellow", "green", "orange", "purple", "brown")]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: stream_chat(client, [{"role": "user", "content": p}]), prompts))
    assert len({replica for replica, _, _ in results}) == 2, results  # new conversations spread out
    expected = greedy_chat_reference(reference_llm, prompts, 12)
    assert [text for _, text, _ in results] == expected
    assert all(finish in ("length", "stop") for _, _, finish in results)


def test_a_conversation_stays_on_its_replica_and_reuses_its_prefix_cache(client, cluster):
    messages = [
        {"role": "user", "content": "Write one sentence about the sea, then one about the mountains."}
    ]
    replica, answer, _ = stream_chat(client, messages, max_tokens=24)
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    turn1_tokens = first.usage.prompt_tokens
    for turn in range(2):
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"Shorter, please ({turn})."},
        ]
        prompt_before = metric(cluster.url, "prompt_tokens_total")
        computed_before = metric(cluster.url, "prompt_tokens_computed_total")
        again, answer, _ = stream_chat(client, messages, max_tokens=16)
        assert again == replica
        cached = (metric(cluster.url, "prompt_tokens_total") - prompt_before) - (
            metric(cluster.url, "prompt_tokens_computed_total") - computed_before
        )
        # at least every full block of the first turn's prompt came from this replica's prefix cache
        assert cached >= (turn1_tokens // BLOCK) * BLOCK, (cached, turn1_tokens)


def test_bad_requests_and_auth_behave_as_on_one_machine(client, cluster):
    import httpx
    import openai

    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="context limit|tokens"):
        client.completions.create(model=MODEL, prompt="hi " * 9000, max_tokens=1)
    assert httpx.get(cluster.url + "/health").json() == {"status": "ok"}
    assert "<html" in httpx.get(cluster.url + "/").text.lower()


def test_killing_a_replica_mid_stream_fails_that_stream_and_the_service_keeps_answering(client):
    import openai
    import ray

    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=400,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
    ) as response:  # fmt: skip
        victim = response.headers[HEADER]
        chunks = response.parse()
        next(chunks), next(chunks)  # it is generating
        name = next(
            n["name"] for n in ray.util.list_named_actors(all_namespaces=True) if n["name"].endswith(victim)
        )
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        with pytest.raises(openai.APIError, match="failed"):
            for _ in chunks:
                pass
    served = []
    deadline = time.monotonic() + 60
    while len(served) < 3 and time.monotonic() < deadline:
        replica, text, finish = stream_chat(client, [{"role": "user", "content": f"Say {len(served)}."}], 4)
        assert text and finish
        served.append(replica)
    assert len(served) == 3
