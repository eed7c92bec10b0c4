"""The official `openai` client (sync and async, streaming and not) against a real server on loopback."""

from __future__ import annotations

import asyncio

import pytest

from tests.server.conftest import API_KEY, MODEL, greedy_chat_reference

openai = pytest.importorskip("openai")

PROMPT = "Name a primary color."
TOKENS = 8


@pytest.fixture(scope="module")
def expected(reference_llm):
    return greedy_chat_reference(reference_llm, [PROMPT], TOKENS)[0]


def _messages(text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_sync_chat_equals_offline_engine(client, expected):
    r = client.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=TOKENS, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_sync_stream_with_usage_chunk(client, expected, reference_llm):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_messages(),
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *content_chunks, last = chunks
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == expected
    assert all(c.usage is None for c in content_chunks)
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert last.choices == [] and last.usage is not None  # OpenAI's final usage-only chunk
    prompt_len = len(reference_llm.chat_prompt(_messages()))
    assert last.usage.prompt_tokens == prompt_len
    assert 1 <= last.usage.completion_tokens <= TOKENS


def test_stream_without_include_usage_has_no_usage(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=_messages(), max_tokens=3, temperature=0, stream=True
        )
    )
    assert all(getattr(c, "usage", None) is None for c in chunks) and all(c.choices for c in chunks)


def test_async_client_streaming_and_not(server, expected):
    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as client:
            whole = await client.chat.completions.create(
                model=MODEL, messages=_messages(), max_tokens=TOKENS, temperature=0
            )
            stream = await client.chat.completions.create(
                model=MODEL, messages=_messages(), max_tokens=TOKENS, temperature=0, stream=True
            )
            pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return whole.choices[0].message.content, "".join(pieces)

    whole, streamed = asyncio.run(main())
    assert whole == streamed == expected


def test_completions_text_and_token_ids(client, reference_llm):
    from slimlm.engine.params import SamplingParams

    prompt = "The capital of France is"
    offline = reference_llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0))[0]
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    ids = reference_llm.encode_prompt(prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text == offline.text
    assert by_text.usage.prompt_tokens == len(ids)
    assert by_text.usage.completion_tokens == len(offline.token_ids)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + offline.text


def test_completions_stream_batch_prompts_and_n(client, reference_llm):
    from slimlm.engine.params import SamplingParams

    prompts = ["1, 2, 3,", "Roses are red,"]
    offline = [o.text for o in reference_llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0))]
    stream = client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0, stream=True
    )
    texts = ["", "", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [offline[0], offline[0], offline[1], offline[1]]  # choice i belongs to prompt i // n


def test_seeded_sampling_is_reproducible_and_n_choices_differ(client):
    kwargs = dict(
        model=MODEL, messages=_messages("Write a word."), max_tokens=10, temperature=1.0, seed=1234, n=3
    )
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len(set(texts)) > 1  # each choice draws from its own seed


def test_vllm_style_extra_sampling_fields_are_accepted(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=_messages(),
        max_tokens=6,
        temperature=0.8,
        seed=7,
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.2,
            "no_repeat_ngram_size": 2,
            "ignore_eos": True,
            "min_tokens": 6,
        },
    )
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_stop_string_cuts_the_reply(client, reference_llm):
    from slimlm.engine.params import SamplingParams

    prompt = "1, 2, 3, 4,"
    full = reference_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0))[0].text
    stop = full.strip()[:2]
    assert stop, "the model produced no text to stop on"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_logprobs_chat_and_completion(client):
    r = client.chat.completions.create(
        model=MODEL, messages=_messages(), max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        assert len(e.top_logprobs) == 3
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)  # greedy picks the top token
        assert e.logprob <= 0
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")
