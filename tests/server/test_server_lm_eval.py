"""Issue 22 item 4: lm-eval's `local-completions` model scores multiple-choice tasks through
`/v1/completions` with `echo: true, logprobs: 1` and slices the prompt-token logprobs. Without them
every task scored at chance with no error. Here lm-eval runs a small local task against a real server
(no network: local JSONL, a tokenizer directory exported from the model) and the loglikelihoods it
gets must equal the engine's own prompt scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.server.conftest import API_KEY, MODEL

DATA = Path(__file__).parent / "data" / "tiny_mc"


@pytest.fixture
def lm_eval_env(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is optional: install slimlm[eval]")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # local-completions sends it as the bearer token
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml = (DATA / "tiny_mc.yaml").read_text().replace("DATA_FILE", str(DATA / "tiny_mc.jsonl"))
    (tasks / "tiny_mc.yaml").write_text(yaml)
    return tasks


def test_lm_eval_local_completions_gets_the_engines_loglikelihoods(server, served_llm, lm_eval_env, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from slimlm.engine.scoring import prompt_logprobs
    from slimlm.tokenizer.save import save_tokenizer

    tokenizer_dir = tmp_path / "tokenizer"
    save_tokenizer(served_llm.tokenizer, tokenizer_dir)
    model_args = {
        "model": MODEL,
        "base_url": server.url + "/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer_dir),
        "tokenized_requests": True,
        "num_concurrent": 2,
        "max_retries": 1,
    }
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=["slimlm_tiny_mc"],
        task_manager=TaskManager(include_path=str(lm_eval_env), include_defaults=False),
        log_samples=True,
        batch_size=3,
    )
    samples = results["samples"]["slimlm_tiny_mc"]
    docs = [json.loads(line) for line in (DATA / "tiny_mc.jsonl").read_text().splitlines()]
    assert len(samples) == len(docs)

    model = served_llm.engine.model
    tok = served_llm.tokenizer
    for sample in samples:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        got = [float(r[0][0]) if isinstance(r[0], list | tuple) else float(r[0]) for r in sample["resps"]]
        want = []
        for choice in doc["choices"]:
            # lm-eval joins them with the task's target_delimiter (" "); the continuation is what
            # encoding the whole adds after the context
            whole, ctx = tok.encode(f"{context} {choice}"), tok.encode(context)
            entries = prompt_logprobs(model, whole)
            want.append(sum(e.logprob for e in entries[len(ctx) :]))
        assert got == pytest.approx(want, abs=1e-4), (doc, got, want)
        assert max(range(len(want)), key=want.__getitem__) == doc["answer"], doc  # an easy task
    assert results["results"]["slimlm_tiny_mc"]["acc,none"] == 1.0
