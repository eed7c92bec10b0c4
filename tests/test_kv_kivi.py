"""The int4 pool (slimlm/kv/kivi.py): KIVI keys per channel per block, the newest tokens staged in bf16
until their block fills, the first blocks of each sequence (attention sinks) kept in bf16. Checked against a reference written from the rule itself, across ways of
feeding the same tokens, on the C decode kernel, and through the engine (slots given back)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from slimlm.errors import SlimlmError
from slimlm.kv import make_kv_cache
from slimlm.kv.kivi import Int4KiviPagedKVCache
from slimlm.kv.metadata import AttnMetadata
from slimlm.kv.quant_ops import rotation_matrix
from tests.test_kv_quant import tiny_config
from tests.tiny_models import make_hf_model, paged_decode_logits, slimlm_from_hf


def _fake_quant(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Asymmetric 4-bit quantize-dequantize along `dim` over [min(x, 0), max(x, 0)], fp16 scale."""
    lo = x.amin(dim=dim, keepdim=True).clamp(max=0)
    hi = x.amax(dim=dim, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 15).clamp(2.0**-24).half().float()
    z = torch.round(-lo / s).clamp(0, 15)
    return (torch.round(x / s + z).clamp(0, 15) - z) * s


def _reference(q, k, v, block: int, scale: float, v_group: int = 0, sink_blocks: int = 0) -> torch.Tensor:
    """One sequence's causal attention as the rule says: a query at t reads the blocks before its own
    per-channel (K) / per-token, per `v_group` channels (V) int4, its own block up to t and the first
    `sink_blocks` blocks in bf16; all turned by the rotation."""
    rot = rotation_matrix(q.shape[-1])
    q, k, v = q @ rot, (k @ rot).bfloat16().float(), (v @ rot).bfloat16().float()
    t, d = q.shape[0], q.shape[-1]
    n = t // block * block
    kq, vq = k.clone(), v.clone()
    kq[:n] = _fake_quant(k[:n].view(-1, block, *k.shape[1:]), 1).view(n, *k.shape[1:])
    g = v_group or d
    vq[:n] = _fake_quant(v[:n].unflatten(-1, (d // g, g)), -1).flatten(-2)
    pos = torch.arange(t)
    own = ((pos[None, :] // block) == (pos[:, None] // block)) | (pos[None, :] // block < sink_blocks)
    rep = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)
    kh, vh, kqh, vqh = (x.repeat_interleave(rep, 1).transpose(0, 1) for x in (k, v, kq, vq))
    scores = torch.where(own, qh @ kh.transpose(1, 2), qh @ kqh.transpose(1, 2)) * scale
    probs = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf")).softmax(-1)
    out = (probs * own) @ vh + (probs * ~own) @ vqh
    return out.transpose(0, 1) @ rot.T


@pytest.fixture(params=[0, 8], ids=["v-whole-head", "v-groups-of-8"])
def v_group(request, monkeypatch):
    """The pool's value scale group: the whole head, and groups that split these tiny heads (the
    format's own preferred group applies at SmolLM2's head_dim 64; tests/test_kv_formats.py)."""
    fmt = dataclasses.replace(Int4KiviPagedKVCache.format, v_group=request.param)
    monkeypatch.setattr(Int4KiviPagedKVCache, "format", fmt)
    return request.param


@pytest.fixture(params=[0, 1], ids=["no-sink", "sink-1-block"])
def sink_blocks(request, monkeypatch):
    """Leading blocks kept exact: none, and one block of these tests' 4 tokens (the shipped format keeps
    32 tokens, which would cover the tiny sequences here whole)."""
    fmt = dataclasses.replace(Int4KiviPagedKVCache.format, sink_tokens=4 * request.param)
    monkeypatch.setattr(Int4KiviPagedKVCache, "format", fmt)
    return request.param


@pytest.mark.parametrize("chunks", [[13], [1] * 13, [3, 6, 4]])
def test_pool_attends_by_the_rule_however_the_tokens_come(chunks, v_group, sink_blocks):
    config = tiny_config()
    gen = torch.Generator().manual_seed(0)
    t, layers = sum(chunks), config.num_hidden_layers
    q = torch.randn(layers, t, config.num_attention_heads, config.head_dim, generator=gen)
    k = torch.randn(layers, t, config.num_key_value_heads, config.head_dim, generator=gen) * 2 + 0.5
    k[..., 3] *= 8  # an outlier channel, as real keys have
    v = torch.randn(layers, t, config.num_key_value_heads, config.head_dim, generator=gen)
    cache = Int4KiviPagedKVCache(config, 6, 4, staging_slots=3)
    cache.prepare_blocks(range(6))
    table = torch.tensor([[5, 0, 3, 1]])
    outs, start = [], 0
    for n in chunks:
        meta = AttnMetadata(
            [n],
            [start + n],
            block_tables=table,
            slot_mapping=table[0, torch.arange(start, start + n) // 4] * 4
            + torch.arange(start, start + n) % 4,
        )
        outs.append(
            torch.stack(
                [
                    cache.attend(
                        i, q[i, start : start + n], k[i, start : start + n], v[i, start : start + n], meta
                    )
                    for i in range(layers)
                ]
            )
        )
        start += n
    got = torch.cat(outs, dim=1)
    for i in range(layers):
        expected = _reference(q[i], k[i], v[i], 4, cache.scale, v_group, sink_blocks)
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-4)
    assert cache.v_scale.shape[-1] == config.head_dim // (v_group or config.head_dim)
    # 13 tokens: blocks 5, 0, 3 full and quantized (5 kept staged as a sink), block 1 holds one staged token
    assert cache.stage_of.tolist().count(-1) == 5 - sink_blocks and int(cache.stage_of[1]) >= 0
    assert (int(cache.stage_of[5]) >= 0) == bool(sink_blocks)


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels():
    from slimlm.kv.kivi import dequantize_channels, quantize_channels
    from slimlm.kv.quant_ops import dequantize, quantize

    gen = torch.Generator().manual_seed(1)
    k = torch.randn(16, 3, 64, generator=gen)
    k[..., [5, 40]] *= 20  # fixed outlier channels
    per_channel = dequantize_channels(*quantize_channels(k), torch.float32)
    per_token = dequantize(*quantize(k, 4), 4, torch.float32)
    assert (per_channel - k).norm() < 0.5 * (per_token - k).norm()


def test_staging_slots_run_out_with_a_clear_error():
    config = tiny_config()
    cache = Int4KiviPagedKVCache(config, 8, 4, staging_slots=1)
    cache.prepare_blocks(range(8))
    cache.prepare_decode([1], [[2]])  # block 2 takes the only slot
    with pytest.raises(SlimlmError, match="staging slots"):
        cache.prepare_decode([1], [[4]])
    cache.release_block(2)
    cache.prepare_decode([1], [[4]])


def test_c_kernel_reads_and_writes_the_int4_pool_as_pytorch_does(v_group, sink_blocks):
    from slimlm.kernels.fused_decode import FusedDecoder
    from slimlm.models.prepack import prepare_linears

    model = slimlm_from_hf(make_hf_model("llama"), torch.bfloat16)
    reference = copy.deepcopy(model).float()
    prepare_linears(model, "plain")
    tokens = torch.randint(0, 128, (22,), generator=torch.Generator().manual_seed(1)).tolist()
    table = [9, 2, 11, 0, 5, 7]

    def pool(dtype):
        c = make_kv_cache(model.config, 12, 4, "int4", dtype, "cpu", max_seqs=1)
        c.prepare_blocks(range(12))
        return c

    cache = pool(torch.bfloat16)
    assert cache.v_group == v_group  # head_dim 16: groups of 8 split it
    decoder, why = FusedDecoder.create(model, cache, max_ctx=32)
    assert why == "C kernel", why
    fused = torch.cat([decoder.decode([t], [p], [table]) for p, t in enumerate(tokens[:-1])])
    expected = paged_decode_logits(reference, pool(torch.float32), tokens, table)
    eager = paged_decode_logits(model, pool(torch.bfloat16), tokens, table)
    fused_err = (fused - expected[:-1]).abs().max()
    assert fused_err < 0.02 * expected.abs().max()
    assert fused_err <= (eager[:-1] - expected[:-1]).abs().max()
    assert torch.equal(fused.argmax(-1), expected[:-1].argmax(-1))
    # the PyTorch path continues from what the kernel stored (codes, channel scales, the staged block)
    last = paged_decode_logits(model, cache, tokens, table, start=len(tokens) - 1)[0]
    torch.testing.assert_close(last, eager[-1], atol=0.05 * eager[-1].abs().max().item(), rtol=0)
    # only the last, unfinished block and the sink block keep a slot
    assert cache.stage_of.tolist().count(-1) == 11 - sink_blocks


def test_engine_gives_slots_back_and_preemption_keeps_the_tokens(smollm, monkeypatch):
    # float32, as the int8 preemption test: both runs stay on the PyTorch path (a bf16 model decodes
    # on the C kernel but recomputes preempted prompts in PyTorch, whose bf16 roundings differ)
    from slimlm.bench.workload import REFERENCE_PROMPTS
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams

    # one sink block of 8 (the shipped 32 tokens would hold these short prompts whole)
    fmt = dataclasses.replace(Int4KiviPagedKVCache.format, sink_tokens=8)
    monkeypatch.setattr(Int4KiviPagedKVCache, "format", fmt)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    roomy = LLM.from_loaded(smollm, kv_cache_tokens=1024, block_size=8, kv_dtype="int4")
    expected = [o.token_ids for o in roomy.generate(REFERENCE_PROMPTS, greedy)]
    # every finished sequence gave its slots back, but for its sink blocks kept in the prefix cache
    held = torch.nonzero(roomy.engine.cache.stage_of >= 0).flatten().tolist()
    assert held and set(held) <= set(roomy.engine.block_manager._evictable)
    assert len(held) <= len(REFERENCE_PROMPTS) * roomy.engine.cache.sink_blocks
    tight = LLM.from_loaded(
        smollm, kv_cache_tokens=96, block_size=8, kv_dtype="int4", enable_prefix_caching=False
    )
    outs = [o.token_ids for o in tight.generate(REFERENCE_PROMPTS, greedy)]
    assert tight.engine.stats.preemptions > 0
    assert outs == expected  # what a token reads depends on positions only, not on recomputation
    assert (tight.engine.cache.stage_of == -1).all()


def test_sdpa_reference_is_plain_attention_without_quantization():
    """Sanity of the reference itself: with quantization removed it is causal attention."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(8, 4, 16, generator=gen),
        torch.randn(8, 2, 16, generator=gen),
        torch.randn(8, 2, 16, generator=gen),
    )
    exact = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    got = _reference(q, k, v, block=16, scale=16**-0.5)  # one block: all read exact (bf16)
    torch.testing.assert_close(got, exact, atol=0.02, rtol=0)


def test_cached_sink_blocks_give_their_slots_to_new_sequences(smollm):
    """One sequence at a time, so the pool has (2 + 4 sink blocks) + 1 slots: each finished prompt
    leaves its sink blocks cached with their slots, and the next prompt's sink blocks take them back
    (the block manager forgets those cached blocks). Answers as with room for all; asking again for a
    forgotten prompt recomputes it to the same answer."""
    from slimlm.bench.workload import REFERENCE_PROMPTS
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams

    greedy = SamplingParams(max_tokens=8, temperature=0)
    prompts = [" ".join([p] * 6) for p in REFERENCE_PROMPTS[:3]]  # past the 32 sink tokens
    roomy = LLM.from_loaded(smollm, kv_cache_tokens=1024, block_size=8, kv_dtype="int4")
    expected = [o.token_ids for o in roomy.generate(prompts, greedy)]
    one = LLM.from_loaded(smollm, kv_cache_tokens=1024, block_size=8, kv_dtype="int4", max_num_seqs=1)
    cache, manager = one.engine.cache, one.engine.block_manager
    assert cache.sink_blocks == 4 and cache.stage_k.shape[1] == 7
    assert [o.token_ids for o in one.generate(prompts, greedy)] == expected
    assert [o.token_ids for o in one.generate(prompts[:1], greedy)] == expected[:1]
    held = torch.nonzero(cache.stage_of >= 0).flatten().tolist()
    assert held and set(held) <= set(manager._evictable)
