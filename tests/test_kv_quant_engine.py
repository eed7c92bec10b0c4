"""The engine over int8/int4 KV pools on the real SmolLM2 model: capacity, greedy outputs, preemption, prefix cache."""

from __future__ import annotations

import pytest

from slimlm.bench.workload import REFERENCE_PROMPTS
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.plan.inference import kv_block_bytes

PROMPTS = REFERENCE_PROMPTS
GREEDY = SamplingParams(max_tokens=16, temperature=0)


def _all_blocks_free(llm: LLM) -> bool:
    return llm.engine.block_manager.num_free_blocks == llm.engine.budget.num_blocks


@pytest.fixture(scope="module")
def float_outputs(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=1024, block_size=8)
    return [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def int8_outputs(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=1024, block_size=8, kv_dtype="int8")
    outs = [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]
    assert _all_blocks_free(llm)
    return outs


def test_same_byte_budget_holds_2x_and_3_5x_the_bf16_tokens(smollm):
    budget = 8 * 2**20
    tokens = {}
    for kv_dtype in ("bf16", "int8", "int4"):
        llm = LLM.from_loaded(smollm, kv_cache_bytes=budget, kv_dtype=kv_dtype, max_num_seqs=2)
        report = llm.memory_report()
        assert report["kv_dtype"] == kv_dtype
        assert report["kv_pool_bytes"] <= budget  # int4's bf16 staging slots included
        # the pool spends the budget: less than one more block would have fitted
        block = kv_block_bytes(smollm.config, kv_dtype, 16)
        assert budget - report["kv_pool_bytes"] < block
        assert kv_dtype in llm.memory_report_text()
        tokens[kv_dtype] = report["kv_tokens"]
    assert tokens["int8"] >= 1.9 * tokens["bf16"]
    # 3.24x per block, less the bf16 staging for 2 sequences (9 slots: 2 sink blocks and 2 unfinished
    # blocks each, + 1; 3.2 MiB of these 8): 2.0x here
    assert tokens["int4"] >= 1.95 * tokens["bf16"]


def test_int8_greedy_generations_match_the_float_cache(float_outputs, int8_outputs):
    same = sum(a == b for a, b in zip(float_outputs, int8_outputs, strict=True))
    assert same >= len(PROMPTS) - 1, (float_outputs, int8_outputs)
    for a, b in zip(float_outputs, int8_outputs, strict=True):
        assert a[:4] == b[:4]  # where they differ, they part late


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_int4_generations_stay_close(smollm, float_outputs):
    # int4 KV costs SmolLM2-135M ~9% perplexity (benchmarks/kv_quant.py): greedy text parts sooner, but the
    # next token after each prompt is still the float cache's, and the continuations share a good start.
    llm = LLM.from_loaded(smollm, kv_cache_tokens=1024, block_size=8, kv_dtype="int4")
    outs = [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]
    assert _all_blocks_free(llm)
    assert all(len(o) == GREEDY.max_tokens for o in outs)
    assert sum(a[0] == b[0] for a, b in zip(float_outputs, outs, strict=True)) >= len(PROMPTS) - 1
    shared = [_first_divergence(a, b) for a, b in zip(float_outputs, outs, strict=True)]
    assert sum(shared) >= 0.25 * sum(map(len, float_outputs)), shared


def test_int8_preemption_gives_the_same_tokens(smollm, int8_outputs):
    llm = LLM.from_loaded(
        smollm, kv_cache_tokens=96, block_size=8, kv_dtype="int8", enable_prefix_caching=False
    )
    outs = [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]
    assert llm.engine.stats.preemptions > 0
    assert outs == int8_outputs
    assert _all_blocks_free(llm)


def test_int4_prefix_cache_hit_reuses_quantized_blocks(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=512, block_size=4, kv_dtype="int4")
    first = llm.generate(PROMPTS[2], GREEDY)[0]
    before = llm.engine.stats.computed_prompt_tokens
    second = llm.generate(PROMPTS[2], GREEDY)[0]
    assert llm.engine.stats.computed_prompt_tokens - before <= 4  # only the partial last block was recomputed
    assert second.token_ids == first.token_ids
    assert _all_blocks_free(llm)


def test_int4_staging_larger_than_the_byte_budget_is_one_clear_error(smollm):
    from slimlm.errors import SlimlmError

    with pytest.raises(SlimlmError, match="staging for 64 sequences alone needs .* lower --max-num-seqs"):
        LLM.from_loaded(smollm, kv_cache_bytes=2**20, kv_dtype="int4", max_num_seqs=64)
