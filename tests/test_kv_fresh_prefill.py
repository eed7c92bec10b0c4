"""Prefill of fresh prompts (nothing cached) in one step: sequences of one length share one attention call
(slimlm/kv/paged.py, `_attend_fresh`). A packed step of different lengths must give every sequence the
same logits as prefilling it alone, in every paged KV format and family (bit for bit in bf16; float32
linears round differently with the number of rows, in either attention path), the attention itself must
equal the per-sequence path's (`attend_one`) bit for bit, and the float pools must match transformers."""

from __future__ import annotations

import pytest
import torch

from slimlm.config import ModelConfig
from slimlm.kv import make_kv_cache
from slimlm.kv.attention import attend_one
from slimlm.kv.metadata import AttnMetadata
from tests.tiny_models import make_hf_model, slimlm_from_hf

BLOCK = 4
# two sequences of one length (one batched call), lengths past mistral's window (12) and gemma's (6)
LENS = [5, 9, 3, 9, 14]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3-plain", "gemma3"]
KV = ["bfloat16", "float32", "int8", "k8v4", "int4"]


def _prefill(model, kv_dtype: str, prompts: list[list[int]], first_block: int = 0) -> list[torch.Tensor]:
    """Logits [len, vocab] of every position of each prompt, all prefilled in one step."""
    dtype = next(model.parameters()).dtype
    cache = make_kv_cache(model.config, 40, BLOCK, kv_dtype, dtype, "cpu", max_seqs=len(prompts))
    tables, slots, block = [], [], first_block
    for p in prompts:
        n = -(-len(p) // BLOCK)
        table = list(range(block, block + n))
        block += n
        tables.append(table)
        slots += [table[i // BLOCK] * BLOCK + i % BLOCK for i in range(len(p))]
    cache.prepare_blocks(range(40))
    width = max(map(len, tables))
    lens = [len(p) for p in prompts]
    meta = AttnMetadata(
        query_lens=lens,
        context_lens=lens,
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables]),
        slot_mapping=torch.tensor(slots),
    )
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.tensor([i for p in prompts for i in range(len(p))])
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, pos, cache, meta))
    return list(logits.split(lens))


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in LENS]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kv_dtype", KV)
def test_packed_fresh_prefill_equals_each_sequence_alone(arch, kv_dtype):
    dtype = torch.float32 if kv_dtype == "float32" else torch.bfloat16
    model = slimlm_from_hf(make_hf_model(arch), dtype)
    prompts = _prompts()
    packed = _prefill(model, kv_dtype, prompts)
    for i, p in enumerate(prompts):
        alone = _prefill(model, kv_dtype, [p], first_block=7)[0]  # other blocks of the pool, too
        if dtype == torch.bfloat16:
            assert torch.equal(packed[i], alone), (arch, kv_dtype, i)
        else:
            torch.testing.assert_close(packed[i], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_prefill_matches_transformers(arch):
    hf = make_hf_model(arch)
    model = slimlm_from_hf(hf, torch.float32)
    prompts = _prompts(1)
    packed = _prefill(model, "float32", prompts)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(packed[i], ref, atol=2e-4, rtol=1e-4, msg=f"{arch} sequence {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 6])
def test_packed_attention_equals_attend_one(dtype, window):
    """The attention of a packed fresh step against attend_one on each sequence's own q, k, v."""
    config = ModelConfig(family="llama", vocab_size=64, hidden_size=96, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2,
                         sliding_window=window)  # fmt: skip
    cache = make_kv_cache(config, 40, BLOCK, "auto", dtype, "cpu")
    cache.prepare_blocks(range(40))
    g = torch.Generator().manual_seed(2)
    t, d = sum(LENS), config.head_dim
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for h in (6, 2, 2))
    tables, slots, block = [], [], 3
    for n in LENS:
        table = list(range(block, block + -(-n // BLOCK)))
        block += len(table)
        tables.append(table + [-1] * (4 - len(table)))
        slots += [table[i // BLOCK] * BLOCK + i % BLOCK for i in range(n)]
    meta = AttnMetadata(query_lens=LENS, context_lens=LENS, block_tables=torch.tensor(tables),
                        slot_mapping=torch.tensor(slots))  # fmt: skip
    with torch.inference_mode():
        packed = cache.attend(0, q, k, v, meta)
    start = 0
    for n in LENS:
        part = slice(start, start + n)
        expected = attend_one(q[part], k[part], v[part], config.attn_scale, window)
        assert torch.equal(packed[part], expected), (n, window)
        start += n
