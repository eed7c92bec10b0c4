"""The paged, batched engine against the single-sequence reference on the real SmolLM2 model."""

from __future__ import annotations

import pytest

from slimlm.bench.workload import REFERENCE_PROMPTS
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError
from slimlm.generation import generate_tokens

PROMPTS = REFERENCE_PROMPTS
GREEDY = SamplingParams(max_tokens=20, temperature=0)


@pytest.fixture(scope="module")
def references(smollm):
    """Single-sequence greedy generations over a contiguous cache."""
    llm = LLM.from_loaded(smollm, kv_cache_tokens=2048)
    eos = smollm.config.eos_token_ids
    return {
        p: list(generate_tokens(smollm.model, llm.encode_prompt(p), GREEDY.max_tokens, eos_token_ids=eos))
        for p in PROMPTS
    }


def _all_blocks_free(llm: LLM) -> bool:
    return llm.engine.block_manager.num_free_blocks == llm.engine.budget.num_blocks


def test_batched_paged_greedy_equals_single_sequence(smollm, references):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=2048, block_size=8)
    outputs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert out.token_ids == references[prompt], prompt
    assert _all_blocks_free(llm)


def test_prefix_cache_hit_gives_identical_tokens(smollm, references):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=2048, block_size=4)
    first = llm.generate(PROMPTS[2], GREEDY)[0]
    computed_before = llm.engine.stats.computed_prompt_tokens
    second = llm.generate(PROMPTS[2], GREEDY)[0]
    recomputed = llm.engine.stats.computed_prompt_tokens - computed_before
    prompt_len = len(llm.encode_prompt(PROMPTS[2]))
    assert first.token_ids == second.token_ids == references[PROMPTS[2]]
    assert recomputed < prompt_len  # the cached full blocks were not recomputed
    assert recomputed <= 4  # at most the last (partial) block


def test_tiny_budget_forces_preemption_and_outputs_stay_identical(smollm, references):
    # 96 tokens hold ~2-3 of these sequences at once, so six of them must preempt one another.
    llm = LLM.from_loaded(smollm, kv_cache_tokens=96, block_size=8, enable_prefix_caching=False)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.stats.preemptions > 0
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert out.token_ids == references[prompt], prompt
    assert _all_blocks_free(llm)


def test_cancelled_stream_frees_its_blocks(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=512, block_size=8)
    stream = llm.stream(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0))
    next(stream)
    next(stream)
    assert not _all_blocks_free(llm)
    stream.close()  # the caller goes away mid-generation
    assert _all_blocks_free(llm)
    assert not llm.engine.has_unfinished()


def test_seeded_sampling_is_reproducible_whatever_the_batch(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=2048)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = llm.generate(PROMPTS[0], seeded)[0].token_ids
    noisy = SamplingParams(max_tokens=16, temperature=1.0)
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[3]], [noisy, seeded, noisy])
    assert batch[1].token_ids == alone
    other_seed = llm.generate(
        PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99)
    )[0]
    assert other_seed.token_ids != alone


def test_stop_string_cuts_the_text_and_finishes(smollm, references):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=1024)
    full = llm.generate(PROMPTS[3], GREEDY)[0].text  # " 4, 5, 6, 7, ..."
    out = llm.generate(PROMPTS[3], SamplingParams(max_tokens=20, temperature=0, stop=["6,"]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index("6,")]
    assert len(out.token_ids) < len(full)


def test_max_tokens_and_ignore_eos(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=1024)
    prompt = llm.chat_prompt([{"role": "user", "content": "Say hi."}])
    natural = llm.generate(prompt, SamplingParams(max_tokens=64, temperature=0))[0]
    assert natural.finish_reason == "stop"  # the chat model ends its reply with <|im_end|>
    forced = llm.generate(
        prompt, SamplingParams(max_tokens=len(natural.token_ids) + 5, temperature=0, ignore_eos=True)
    )[0]
    assert forced.finish_reason == "length"
    assert len(forced.token_ids) == len(natural.token_ids) + 5


def test_prompt_longer_than_context_is_a_clear_error(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=256, max_model_len=32)
    with pytest.raises(SlimlmError, match="context limit is 32"):
        llm.generate(list(range(10, 50)), GREEDY)


def test_kv_budget_too_small_for_one_sequence(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=16, block_size=8)
    with pytest.raises(SlimlmError, match="block"):
        llm.generate(list(range(10, 40)), GREEDY)


def test_memory_report_counts_allocated_bytes(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=1000, block_size=16)
    report = llm.memory_report()
    cfg = smollm.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32 K and V
    assert report["kv_tokens"] == 1008  # rounded up to whole blocks
    assert report["kv_pool_bytes"] == per_token * 1008 == llm.engine.cache.k.nbytes * 2
    assert (
        report["weights_bytes"]
        == cfg.num_parameters() * 4 + llm.loaded.model.model.rotary_emb.inv_freq.nbytes
    )


@pytest.mark.parametrize("num_beams,length_penalty", [(3, 1.0), (4, 0.5)])
def test_beam_search_equals_transformers(smollm, hf_smollm, num_beams, length_penalty):
    import torch

    llm = LLM.from_loaded(smollm, kv_cache_tokens=512)
    prompt = llm.chat_prompt([{"role": "user", "content": "Name a fruit."}])
    ours = llm.generate(
        prompt,
        SamplingParams(max_tokens=12, temperature=0, num_beams=num_beams, length_penalty=length_penalty),
    )[0]
    with torch.no_grad():
        ref = hf_smollm.generate(
            torch.tensor([prompt]),
            num_beams=num_beams,
            max_new_tokens=12,
            do_sample=False,
            length_penalty=length_penalty,
            eos_token_id=smollm.config.eos_token_ids,
            pad_token_id=2,
        )[0, len(prompt) :].tolist()
    while ref and ref[-1] == 2 and len(ref) > len(ours.token_ids):
        ref.pop()  # HF pads finished beams with pad = eos
    assert ours.token_ids == ref
