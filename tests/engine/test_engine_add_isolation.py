"""A request whose add fails leaves nothing behind: the next step of the other requests is unharmed."""

from __future__ import annotations

import asyncio

import pytest

from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError


@pytest.fixture
def llm(smollm):
    from slimlm.engine.llm import LLM

    return LLM.from_loaded(smollm, kv_cache_tokens=512, block_size=16)


@pytest.fixture
def reference_llm(smollm):
    from slimlm.engine.llm import LLM

    return LLM.from_loaded(smollm, kv_cache_tokens=512, block_size=16)


def _broken_params() -> SamplingParams:
    """Params that slipped past validation (built valid, then changed): torch refuses the seed."""
    params = SamplingParams(max_tokens=4, temperature=0.7, seed=1)
    params.seed = 2**70
    return params


def test_seed_and_top_k_out_of_range_are_user_errors():
    with pytest.raises(SlimlmError, match="seed"):
        SamplingParams(seed=2**64)
    with pytest.raises(SlimlmError, match="seed"):
        SamplingParams(seed=-(2**63) - 1)
    SamplingParams(seed=2**64 - 1)  # torch's own upper bound is accepted


def test_huge_top_k_disables_top_k(llm, reference_llm):
    prompt = "The capital of France is"
    want = reference_llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=3))[0].text
    got = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=3, top_k=2**70))[0]
    assert got.text == want


def test_failed_add_is_removed_cleanly(llm, reference_llm):
    engine = llm.engine
    greedy = SamplingParams(max_tokens=6, temperature=0)
    prompt = llm.encode_prompt("The capital of France is")
    want = reference_llm.generate(prompt, greedy)[0].text
    engine.add_request(prompt, greedy, 101)
    with pytest.raises((ValueError, RuntimeError)):
        engine.add_request(llm.encode_prompt("Hello"), _broken_params(), 102)
    assert set(engine.seqs) == {101}
    assert [s.seq_id for s in engine.scheduler.waiting] == [101]
    assert 102 not in engine.sampler.generators and 102 not in engine.stop_checkers
    text = ""
    while engine.has_unfinished():
        text += "".join(o.text for o in engine.step())
    assert text == want


def test_failed_add_through_the_async_engine_fails_only_its_group(llm, reference_llm):
    from slimlm.server import AsyncEngine
    from slimlm.server.async_engine import EngineFailure

    greedy = SamplingParams(max_tokens=8, temperature=0)
    prompt = llm.encode_prompt("My favourite food is")
    want = reference_llm.generate(prompt, greedy)[0].text
    engine = AsyncEngine(llm)

    async def main():
        good = await engine.submit([(prompt, greedy)])
        with pytest.raises(EngineFailure):
            # the first of the group is added, the second fails: both must leave the engine
            await engine.submit([(prompt, greedy), (llm.encode_prompt("Hi"), _broken_params())])
        text = ""
        async for _, out in good:
            text += out.text
        return text

    try:
        assert asyncio.run(main()) == want
        assert not llm.engine.seqs and not llm.engine.has_unfinished()
        assert engine.snapshot.engine_failures == 0
    finally:
        engine.shutdown()
