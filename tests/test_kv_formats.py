"""The KV format table (slimlm/formats/kv.py) with scale groups: pools, planner and C decode kernel follow
one entry. The shipped formats keep one scale per head where benchmarks/kv_fidelity_sweep.py found no
gain from groups (docs/kv_cache.md); these tests give the pools groups that split the tiny heads, so the
grouped paths stay correct in every part that reads the table."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from slimlm.formats.kv import KV_FORMATS, KVFormat
from slimlm.kernels import build
from slimlm.kv import kv_cache_class, make_kv_cache
from slimlm.plan.inference import kv_block_bytes, kv_staging_bytes
from tests.test_kv_quant import SMOLLM_SHAPE, tiny_config
from tests.tiny_models import make_hf_model, paged_decode_logits, slimlm_from_hf

# name -> (k_group, v_group) the test gives the format; tiny heads are 16 or 32 wide, SmolLM2's 64
GROUPS = {"int8": (8, 8), "k8v4": (4, 8), "int4": (0, 8)}


@pytest.fixture(params=sorted(GROUPS))
def grouped(request, monkeypatch) -> str:
    """One quantized --kv-dtype whose table entry (read by pool, planner and kernel) has scale groups."""
    name = request.param
    k_group, v_group = GROUPS[name]
    fmt = dataclasses.replace(KV_FORMATS[name], k_group=k_group, v_group=v_group)
    monkeypatch.setitem(KV_FORMATS, name, fmt)
    monkeypatch.setattr(kv_cache_class(name), "format", fmt)
    return name


def test_groups_take_effect_only_where_they_split_the_head():
    fmt = KVFormat(4, 4, k_group=32, v_group=16, key_channels=True)
    assert fmt.groups(64) == (0, 16)  # per-channel keys have no per-token group
    assert KVFormat(8, 8, 32, 32).groups(64) == (32, 32)
    assert KVFormat(8, 8, 32, 32).groups(32) == (0, 0)  # one group the size of the head: the head
    assert KVFormat(8, 8, 24, 24).groups(64) == (0, 0)  # does not divide the head
    # scales and zero points per group are counted: int8 at g32 takes 3 more bytes per K and per V
    assert KVFormat(8, 8, 32, 32).bytes_per_token_head(64) == KV_FORMATS["int8"].bytes_per_token_head(64) + 6


@pytest.mark.parametrize("block_size", [4, 16])
def test_planner_bytes_equal_the_grouped_pool(grouped, block_size):
    for config in (tiny_config(head_dim=32), SMOLLM_SHAPE):
        cache = make_kv_cache(config, 6, block_size, grouped, torch.bfloat16, "cpu", max_seqs=2)
        k_group, v_group = KV_FORMATS[grouped].groups(config.head_dim)
        assert (cache.k_group, cache.v_group) == (k_group, v_group)
        staging = kv_staging_bytes(config, grouped, block_size, 2)
        assert cache.nbytes == 6 * kv_block_bytes(config, grouped, block_size) + staging


@pytest.mark.skipif(build.load_kernel("decode_cpu") is None, reason="C decode kernel unavailable")
def test_kernel_reads_and_writes_grouped_pools_as_pytorch_does(grouped):
    """Tiny Llama (head_dim 16): the kernel over a grouped pool against a float32 model over the same
    pool, no further off than PyTorch's bf16 path; then PyTorch continues from what the kernel stored."""
    from slimlm.kernels.fused_decode import FusedDecoder
    from slimlm.models.prepack import prepare_linears

    model = slimlm_from_hf(make_hf_model("llama"), torch.bfloat16)
    reference = copy.deepcopy(model).float()
    prepare_linears(model, "plain")
    tokens = torch.randint(0, 128, (19,), generator=torch.Generator().manual_seed(3)).tolist()
    table = [9, 2, 11, 0, 5, 7]

    def pool(dtype):
        cache = make_kv_cache(model.config, 12, 4, grouped, dtype, "cpu", max_seqs=1)
        cache.prepare_blocks(range(12))
        return cache

    cache = pool(torch.bfloat16)
    assert cache.v_group == GROUPS[grouped][1] and cache.v_scale.shape[-1] == 16 // cache.v_group
    decoder, why = FusedDecoder.create(model, cache, max_ctx=32)
    assert why == "C kernel", why
    fused = torch.cat([decoder.decode([t], [p], [table]) for p, t in enumerate(tokens[:-1])])
    expected = paged_decode_logits(reference, pool(torch.float32), tokens, table)
    eager = paged_decode_logits(model, pool(torch.bfloat16), tokens, table)
    fused_err = (fused - expected[:-1]).abs().max()
    assert fused_err < 0.02 * expected.abs().max()
    assert fused_err <= (eager[:-1] - expected[:-1]).abs().max()
    # the same top-1 token wherever the reference's top-2 margin is wider than the error could close
    top2 = expected[:-1].topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * fused_err
    assert clear.sum() >= len(clear) // 2
    assert torch.equal(fused.argmax(-1)[clear], expected[:-1].argmax(-1)[clear])
    # the last token through PyTorch, over the codes and group scales the kernel wrote
    last = paged_decode_logits(model, cache, tokens, table, start=len(tokens) - 1)[0]
    torch.testing.assert_close(last, eager[-1], atol=0.05 * eager[-1].abs().max().item(), rtol=0)
