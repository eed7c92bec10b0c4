"""AsyncEngine without HTTP: one thread steps the engine for many asyncio callers."""

from __future__ import annotations

import asyncio

import pytest

from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError

GREEDY = SamplingParams(max_tokens=5, temperature=0)


@pytest.fixture
def llm(smollm):
    from slimlm.engine.llm import LLM

    return LLM.from_loaded(smollm, kv_cache_tokens=512, block_size=16)


async def _collect(stream) -> list[str]:
    texts: dict[int, str] = {}
    async for index, out in stream:
        texts[index] = texts.get(index, "") + out.text
    return [texts[i] for i in sorted(texts)]


def test_groups_from_many_callers_equal_offline_generation(llm, reference_llm):
    from slimlm.server import AsyncEngine

    prompts = ["The sky is", "My favourite food is", "Water boils at"]
    expected = [o.text for o in reference_llm.generate(prompts, GREEDY)]
    engine = AsyncEngine(llm)

    async def main():
        ids = [llm.encode_prompt(p) for p in prompts]
        streams = [
            await engine.submit([(ids[0], GREEDY), (ids[1], GREEDY)]),
            await engine.submit([(ids[2], GREEDY)]),
        ]
        return await asyncio.gather(*(_collect(s) for s in streams))

    try:
        first, second = asyncio.run(main())
    finally:
        engine.shutdown()
    assert first + second == expected


def test_refused_prompt_raises_and_queues_nothing(llm):
    from slimlm.server import AsyncEngine

    engine = AsyncEngine(llm)
    too_long = [1] * 600  # more than the 512-token KV pool

    async def main():
        with pytest.raises(SlimlmError, match="KV"):
            await engine.submit([([1, 2, 3], GREEDY), (too_long, GREEDY)])

    try:
        asyncio.run(main())
        assert not llm.engine.has_unfinished()  # the accepted first prompt was withdrawn too
        assert llm.engine.block_manager.num_free_blocks == llm.engine.budget.num_blocks
    finally:
        engine.shutdown()


def test_abort_frees_blocks_and_shutdown_fails_waiting_callers(llm):
    from slimlm.server import AsyncEngine
    from slimlm.server.async_engine import EngineFailure

    engine = AsyncEngine(llm)
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main():
        ids = llm.encode_prompt("Once upon a time")
        stream = await engine.submit([(ids, long)])
        async for _, out in stream:
            if out.token_id is not None:
                break
        stream.abort()
        for _ in range(200):
            if engine.snapshot.requests_aborted == 1 and engine.snapshot.num_running == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.snapshot.kv_blocks_free == engine.snapshot.kv_blocks_total
        still_running = await engine.submit([(ids, long)])
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineFailure, match="shutting down"):
            await _collect(still_running)

    asyncio.run(main())
    assert engine.snapshot.requests_aborted == 1
    assert not llm.engine.has_unfinished()


def test_run_here_steps_the_engine_on_the_calling_thread(llm, reference_llm):
    """`slimlm serve` drives decode steps from the main thread (the one that loaded the model) and
    runs asyncio elsewhere: steps from a second thread were about a third slower (docs/serve.md).
    The clients on another thread's loop get the same text as offline generation, `start()` adds no
    thread of its own, and shutdown() from the loop's thread ends run_here."""
    import threading

    from slimlm.server import AsyncEngine

    prompts = ["The sky is", "Water boils at"]
    expected = [o.text for o in reference_llm.generate(prompts, GREEDY)]
    engine = AsyncEngine(llm)
    step_threads: set[int] = set()
    step = llm.engine.step

    def recording_step():
        step_threads.add(threading.get_ident())
        return step()

    llm.engine.step = recording_step
    results: list = []

    async def clients():
        ids = [llm.encode_prompt(p) for p in prompts]
        streams = [await engine.submit([(i, GREEDY)]) for i in ids]
        return await asyncio.gather(*(_collect(s) for s in streams))

    def loop_thread():
        try:
            results.append(asyncio.run(clients()))
        finally:
            engine.shutdown()

    threads_before = threading.active_count()
    client = threading.Thread(target=loop_thread)
    try:
        engine.run_here(until=lambda: False, on_start=client.start)
    finally:
        llm.engine.step = step
    client.join(timeout=60)
    assert [t for (t,) in results[0]] == expected
    assert step_threads == {threading.get_ident()}
    assert threading.active_count() == threads_before  # no engine thread was started
    assert not engine.is_running
