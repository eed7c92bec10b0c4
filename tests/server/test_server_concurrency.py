"""32 concurrent HTTP clients share one engine loop and each gets its own (offline-equal) answer."""

from __future__ import annotations

import asyncio

import pytest

from tests.server.conftest import API_KEY, MODEL, greedy_chat_reference

openai = pytest.importorskip("openai")

CLIENTS = 32
TOKENS = 6
SUBJECTS = [
    "cats",
    "rivers",
    "the moon",
    "bread",
    "trains",
    "winter",
    "music",
    "chess",
    "the sea",
    "bees",
    "volcanoes",
    "paper",
    "clocks",
    "forests",
    "salt",
    "bridges",
]
PROMPTS = [f"{verb} {subject}." for verb in ("Tell me about", "Write one line on") for subject in SUBJECTS]


def test_32_concurrent_clients_get_their_own_greedy_answer(server, served_llm, reference_llm):
    assert len(PROMPTS) == CLIENTS and len(set(PROMPTS)) == CLIENTS
    expected = greedy_chat_reference(reference_llm, PROMPTS, TOKENS)
    assert len(set(expected)) > CLIENTS // 2  # the prompts really ask different things
    stats = served_llm.engine.stats
    steps_before, tokens_before = stats.steps, stats.generated_tokens

    async def ask(client, i: int) -> str:
        if i % 2:  # half of the clients stream
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": PROMPTS[i]}],
                max_tokens=TOKENS,
                temperature=0,
                stream=True,
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=TOKENS, temperature=0
        )
        return r.choices[0].message.content

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300
        ) as client:
            return list(await asyncio.gather(*(ask(client, i) for i in range(CLIENTS))))

    answers = asyncio.run(main())
    assert answers == expected
    steps = stats.steps - steps_before
    tokens = stats.generated_tokens - tokens_before
    # Served one by one, every token would take its own step; batched, a step serves many clients.
    assert tokens >= CLIENTS
    assert steps <= tokens / 4, f"{steps} steps for {tokens} tokens: the requests were not batched together"
