"""Issue 22 items 4 and 5: prompt logprobs with echo (OpenAI's legacy shape) and chat logprobs that
cover exactly the content tokens."""

from __future__ import annotations

import json

import pytest

from tests.server.conftest import MODEL

SHORT_ANSWER_PROMPTS = [
    "Reply with one word: is fire hot?",
    "Say only 'yes'.",
    "What is 2+2? Answer briefly.",
]


def test_echo_returns_every_prompt_token_logprob(client, reference_llm):
    from slimlm.engine.scoring import prompt_logprobs

    prompt = "The capital of France is Paris"
    ids = reference_llm.encode_prompt(prompt)
    want = prompt_logprobs(reference_llm.engine.model, ids, top=2)
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2
    )
    choice = out.choices[0]
    lp = choice.logprobs
    n = len(ids)
    assert len(lp.tokens) == n + 1  # the prompt, then the generated token
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n] == pytest.approx([e.logprob for e in want[1:]], abs=1e-4)
    tok = reference_llm.tokenizer
    for entry, top in zip(want[1:], lp.top_logprobs[1:n], strict=True):
        assert list(top) == [tok.decode([t], skip_special_tokens=False) for t, _ in entry.top]
    # offsets index the returned text: the prompt's tokens spell the prompt, then the generated token
    assert "".join(lp.tokens[:n]) == prompt
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n + 1)]
    assert choice.text.startswith(prompt) and choice.text[lp.text_offset[n] :] == lp.tokens[n]


def test_max_tokens_zero_with_echo_scores_the_prompt_only(client, http, reference_llm):
    from slimlm.engine.scoring import prompt_logprobs

    prompts = [[1, 2, 3, 4], reference_llm.encode_prompt("Hello world, how are you")]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    assert out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == sum(len(p) for p in prompts)
    for choice, ids in zip(sorted(out.choices, key=lambda c: c.index), prompts, strict=True):
        want = prompt_logprobs(reference_llm.engine.model, ids)
        assert choice.finish_reason == "length"
        assert choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in want[1:]], abs=1e-4)
        assert choice.text == "".join(choice.logprobs.tokens)
    # streamed: the echo chunk carries the prompt's logprobs, then the choice ends
    body = {
        "model": MODEL,
        "prompt": "Hi there",
        "max_tokens": 0,
        "echo": True,
        "logprobs": 1,
        "stream": True,
    }
    with http.stream("POST", "/v1/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["text"] == "Hi there"
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # without echo, max_tokens 0 is still a mistake
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def _stopped_prompt(reference_llm) -> str:
    from slimlm.engine.params import SamplingParams

    for prompt in SHORT_ANSWER_PROMPTS:
        ids = reference_llm.chat_prompt([{"role": "user", "content": prompt}])
        out = reference_llm.generate(ids, SamplingParams(max_tokens=40, temperature=0))[0]
        if out.finish_reason == "stop":
            return prompt
    pytest.fail("no prompt ended with the end-of-turn token within 40 tokens")


def test_chat_logprobs_cover_the_content_tokens_only(client, reference_llm):
    prompt = _stopped_prompt(reference_llm)
    messages = [{"role": "user", "content": prompt}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0, logprobs=True, top_logprobs=1
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    tokens = [e.token for e in choice.logprobs.content]
    assert "".join(tokens) == choice.message.content  # no end-of-turn token in the logprobs
    # usage counts the end-of-turn token: the model generated it (as vLLM counts)
    assert out.usage.completion_tokens == len(tokens) + 1
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0, logprobs=True, stream=True
    )
    streamed = [
        e.token for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert streamed == tokens
