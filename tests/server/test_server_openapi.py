"""Issue 22 item 13: the published OpenAPI document declares what the server really answers (its
error statuses, not FastAPI's never-sent 422; the value limits it enforces; /metrics' text format),
and schemathesis finds no disagreement between the document and the live server."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from slimlm.server.validation import CHAT, COMPLETION
from tests.server.conftest import API_KEY, MODEL

GENERATION = ("/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def document(server) -> dict:
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:  # no key needed for the document
        response = anonymous.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_declared_statuses_are_the_ones_sent(document):
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (method, path)
            if path not in ("/health", "/openapi.json"):
                assert "401" in op["responses"], (method, path)  # the server runs with --api-key
    for path in GENERATION:
        declared = set(document["paths"][path]["post"]["responses"])
        assert {"200", "400", "401", "404", "413", "429"} <= declared
    error = document["components"]["schemas"]["ErrorResponse"]
    assert error["properties"]["error"]["required"] == ["message", "type", "param", "code"]
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_declared_limits_are_the_enforced_ones(document, served_llm):
    schemas = document["components"]["schemas"]
    for name, table in (("ChatCompletionRequest", CHAT), ("CompletionRequest", COMPLETION)):
        props = schemas[name]["properties"]
        for field, limit in table.items():
            branches = props[field].get("anyOf", [props[field]])
            numeric = [b for b in branches if b.get("type") in ("integer", "number")]
            assert numeric, (name, field)
            for branch in numeric:
                lo = branch.get("exclusiveMinimum", branch.get("minimum"))
                assert lo == limit.minimum, (name, field, branch)
                if field in ("max_tokens", "max_completion_tokens"):
                    assert branch["maximum"] == served_llm.engine.max_model_len
                else:
                    assert branch.get("maximum") == limit.maximum, (name, field, branch)
        assert props["model"]["enum"] == [MODEL]


def test_metrics_content_type_is_documented_and_sent(document, http):
    declared = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    sent = http.get("/metrics").headers["content-type"]
    assert list(declared) == ["text/plain; version=0.0.4"] and sent.startswith("text/plain; version=0.0.4")


def _schemathesis() -> str:
    pytest.importorskip("schemathesis", reason="schemathesis is optional: install slimlm[schema]")
    exe = Path(sys.executable).parent / "schemathesis"
    return str(exe) if exe.exists() else (shutil.which("schemathesis") or pytest.skip("no schemathesis CLI"))


def test_schemathesis_finds_no_disagreement(smollm, tmp_path):
    """A bounded schemathesis run (a few examples per operation) against a live server whose context is
    short, so every generated request finishes quickly. `positive_data_acceptance` is left out: rules
    across fields (prompt + max_tokens within the context and the KV pool, min_tokens <= max_tokens,
    top_logprobs needs logprobs) cannot be written in JSON Schema, so a schema-valid body can still be
    a documented 400."""
    transformers = pytest.importorskip("transformers")
    from slimlm.engine.llm import LLM
    from slimlm.loading import LoadedModel
    from slimlm.server import ServerSettings, ServerThread, create_app
    from tests.tiny_models import BASE, slimlm_from_hf

    cli = _schemathesis()
    # A tiny random model over SmolLM2's tokenizer: the server code is the same, each token is cheap,
    # and the short context bounds every generated request.
    hf_config = transformers.LlamaConfig(
        **{**BASE, "vocab_size": smollm.config.vocab_size, "max_position_embeddings": 48}
    )
    torch.manual_seed(0)
    model = slimlm_from_hf(transformers.LlamaForCausalLM(hf_config).eval())
    from slimlm.config import ModelConfig

    config = ModelConfig.from_hf_dict(hf_config.to_dict())
    tiny = LoadedModel(model, config, smollm.tokenizer, {})
    llm = LLM.from_loaded(tiny, kv_cache_tokens=1024, block_size=16, max_num_seqs=8)
    settings = ServerSettings(model_name=MODEL, api_key=API_KEY, max_body_bytes=64 * 1024)
    with ServerThread(create_app(llm, settings)) as server:
        result = subprocess.run(
            [
                cli,
                "run",
                server.url + "/openapi.json",
                "-H",
                f"Authorization: Bearer {API_KEY}",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-examples",
                "3",
                "--max-response-time",
                "120",
                "--request-timeout",
                "120",
                "--workers",
                "1",
                "--phases",
                "coverage,fuzzing",
                "--seed",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    assert result.returncode == 0, result.stdout[-6000:]
