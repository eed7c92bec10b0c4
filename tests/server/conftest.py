"""One real server on a free loopback port, shared by the server tests (SmolLM2, fp32, small KV pool)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY = "test-key-123"
MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def served_llm(smollm):
    from slimlm.engine.llm import LLM

    return LLM.from_loaded(smollm, kv_cache_tokens=4096, block_size=16, max_num_seqs=48)


@pytest.fixture(scope="session")
def reference_llm(smollm):
    """A separate engine for offline answers the server's must equal."""
    from slimlm.engine.llm import LLM

    return LLM.from_loaded(smollm, kv_cache_tokens=4096, block_size=16, max_num_seqs=48)


@pytest.fixture(scope="session")
def server(served_llm):
    from slimlm.server import ServerSettings, ServerThread, create_app

    settings = ServerSettings(
        model_name=MODEL, api_key=API_KEY, max_concurrent_requests=48, max_body_bytes=256 * 1024
    )
    with ServerThread(create_app(served_llm, settings)) as running:
        yield running


@pytest.fixture
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def greedy_chat_reference(reference_llm, prompts: list[str], max_tokens: int) -> list[str]:
    """What the offline engine answers to each prompt as a single user message (greedy)."""
    from slimlm.engine.params import SamplingParams

    ids = [reference_llm.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    outs = reference_llm.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0))
    return [o.text for o in outs]


@pytest.fixture
def slow_client(server):
    """The shared server's client with a longer timeout, for the structured-output and tools tests: a
    constrained request decodes dozens of tokens on the fp32 PyTorch path, minutes when the 2-core
    machine is shared by other jobs."""
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=1800) as c:
        yield c
