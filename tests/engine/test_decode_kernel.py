"""The whole-model C decode kernel (slimlm/kernels) against float32 references, and its fallbacks."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from slimlm.config import ModelConfig
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError
from slimlm.kernels import build
from slimlm.kernels.fused_decode import FusedDecoder
from slimlm.kv.contiguous import ContiguousKVCache
from slimlm.kv.metadata import AttnMetadata
from slimlm.kv.paged import PagedKVCache
from slimlm.kv.quantized import Int4PagedKVCache, Int8PagedKVCache, K8V4PagedKVCache
from slimlm.models.prepack import prepare_linears
from tests.tiny_models import make_hf_model, paged_decode_logits, slimlm_from_hf

pytestmark = pytest.mark.skipif(
    build.load_kernel("decode_cpu") is None,
    reason=f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}",
)


def _incremental_logits(model, tokens: list[int]) -> torch.Tensor:
    """Eager logits [len, vocab] feeding one token per step: the decode semantics, dynamic RoPE included."""
    dtype = next(model.parameters()).dtype
    cache = ContiguousKVCache(model.config, 1, len(tokens), dtype=dtype)
    rows = []
    with torch.inference_mode():
        for pos, token in enumerate(tokens):
            hidden = model(torch.tensor([token]), torch.tensor([pos]), cache, AttnMetadata.single(1, pos + 1))
            rows.append(model.compute_logits(hidden)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("arch", ["llama", "llama-tied", "llama-llama3", "llama-dynamic", "mistral", "qwen2"])
def test_kernel_logits_match_a_float32_run_of_the_same_weights(arch, block_size):
    """Every position's logits, through a shuffled block table; mistral's window (12) is crossed at 20
    tokens, qwen2 has the q/k/v bias, llama-dynamic rescales RoPE past 16 positions. Blocks of 16 also
    take the 16-keys-at-once scoring where a run of 16 keys starts."""
    hf = make_hf_model(arch)
    model = slimlm_from_hf(hf, torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the same bf16-rounded weights, float32 math
    prepare_linears(model, "plain")
    n = 20 if arch != "llama-dynamic" else 24
    tokens = torch.randint(
        0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    cache = PagedKVCache(model.config, num_blocks=12, block_size=block_size, dtype=torch.bfloat16)
    cache.prepare_blocks(range(12))
    table = [9, 2, 11, 0, 5, 7][: -(-24 // block_size)]
    decoder, why = FusedDecoder.create(model, cache, max_ctx=32)
    assert decoder is not None, why
    fused = torch.cat([decoder.decode([t], [pos], [table]) for pos, t in enumerate(tokens)])
    expected = _incremental_logits(reference, tokens)
    eager_bf16 = _incremental_logits(model, tokens)
    fused_err = (fused - expected).abs().max()
    # Only the bf16 KV pool and summation order separate the kernel from float32; PyTorch's bf16 path
    # also rounds every activation, so it must be no closer than the kernel.
    assert fused_err < 0.02 * expected.abs().max()
    assert fused_err <= (eager_bf16 - expected).abs().max()
    assert torch.equal(fused.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_a_sequence_gets_the_same_bits_whatever_else_is_in_the_batch(arch):
    """Mixed lengths, so the live batch shrinks step by step: 10 and 9 sequences run on 4x4 tiles with
    remainders, 7 down to 2 on single-row tiles, 1 alone; each sequence also runs by itself."""
    model = slimlm_from_hf(make_hf_model(arch), torch.bfloat16)
    prepare_linears(model, "plain")
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 17, 1, 9, 14, 3, 11, 2, 7, 16]
    n = len(lengths)
    prompts = [torch.randint(0, model.config.vocab_size, (k,), generator=gen).tolist() for k in lengths]
    tables = [[5 * i + j for j in range(5)] for i in range(n)]  # 5 blocks of 4 per sequence

    def run(batch: list[int]) -> dict[int, torch.Tensor]:
        """Feed the chosen sequences their tokens, all together where they overlap; last logits each."""
        cache = PagedKVCache(model.config, num_blocks=5 * n, block_size=4, dtype=torch.bfloat16)
        cache.prepare_blocks(range(5 * n))
        decoder, _ = FusedDecoder.create(model, cache, max_ctx=20, max_batch=n)
        last = {}
        for pos in range(max(lengths[i] for i in batch)):
            live = [i for i in batch if pos < lengths[i]]
            logits = decoder.decode(
                [prompts[i][pos] for i in live], [pos] * len(live), [tables[i] for i in live]
            )
            last.update({i: logits[j] for j, i in enumerate(live) if pos == lengths[i] - 1})
        return last

    together = run(list(range(n)))
    for i in range(n):
        assert torch.equal(run([i])[i], together[i])
    assert torch.equal(run([0, 1, 2])[1], together[1])


def test_odd_sizes_take_the_tail_paths_and_stay_exact():
    """hidden 30 and intermediate 50 (GEMM inputs not a multiple of 32: masked tails), q/k/v 42 rows and
    a 97-token vocab (row counts not a multiple of 4), head_dim 6: against float32 alone and in a batch
    of 9 (4x4 tiles with remainders), and bit-identical between the two."""
    import transformers

    hf_config = transformers.LlamaConfig(vocab_size=97, hidden_size=30, intermediate_size=50, num_hidden_layers=2,
                                         num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=32,
                                         head_dim=6)  # fmt: skip
    torch.manual_seed(0)
    model = slimlm_from_hf(transformers.LlamaForCausalLM(hf_config).eval(), torch.bfloat16)
    assert model.config.head_dim == 6
    reference = copy.deepcopy(model).float()
    prepare_linears(model, "plain")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (6,), generator=gen).tolist() for _ in range(9)]
    cache = PagedKVCache(model.config, num_blocks=9 * 2, block_size=4, dtype=torch.bfloat16)
    cache.prepare_blocks(range(18))
    decoder, why = FusedDecoder.create(model, cache, max_ctx=8, max_batch=9)
    assert decoder is not None, why
    tables = [[2 * i + 1, 2 * i] for i in range(9)]
    steps = [decoder.decode([p[pos] for p in prompts], [pos] * 9, tables) for pos in range(6)]
    together = torch.stack(steps, dim=1)  # [9, 6, vocab]
    for i in range(9):
        expected = _incremental_logits(reference, prompts[i])
        assert (together[i] - expected).abs().max() < 0.02 * expected.abs().max()
        assert torch.equal(together[i].argmax(-1), expected.argmax(-1))
    alone_cache = PagedKVCache(model.config, num_blocks=2, block_size=4, dtype=torch.bfloat16)
    alone_cache.prepare_blocks(range(2))
    alone, _ = FusedDecoder.create(model, alone_cache, max_ctx=8)
    for i in (0, 8):
        rows = torch.cat([alone.decode([t], [pos], [[1, 0]]) for pos, t in enumerate(prompts[i])])
        assert torch.equal(rows, together[i])


@pytest.mark.parametrize("pool", [Int8PagedKVCache, Int4PagedKVCache, K8V4PagedKVCache])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_kernel_on_quantized_kv_pools_is_closer_to_float32_than_pytorch_bf16(arch, pool):
    """int8 / int4 pools (codes, fp16 scale, uint8 zero, K/V turned by the Hadamard): against a float32
    model over the same kind of pool, the kernel is no further off than PyTorch's bf16 path."""
    model = slimlm_from_hf(make_hf_model(arch), torch.bfloat16)
    reference = copy.deepcopy(model).float()
    prepare_linears(model, "plain")
    tokens = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    table = [9, 2, 11, 0, 5, 7]

    def pool_of(dtype):
        cache = pool(model.config, num_blocks=12, block_size=4, dtype=dtype)
        cache.prepare_blocks(range(12))
        return cache

    decoder, why = FusedDecoder.create(model, pool_of(torch.bfloat16), max_ctx=32)
    assert why == "C kernel"
    fused = torch.cat([decoder.decode([t], [p], [table]) for p, t in enumerate(tokens)])
    expected = paged_decode_logits(reference, pool_of(torch.float32), tokens, table)
    eager_bf16 = paged_decode_logits(model, pool_of(torch.bfloat16), tokens, table)
    fused_err = (fused - expected).abs().max()
    assert fused_err < 0.02 * expected.abs().max()
    assert fused_err <= (eager_bf16 - expected).abs().max()
    assert torch.equal(fused.argmax(-1), expected.argmax(-1))


def test_kernel_on_an_int4_pool_with_a_random_turn():
    """head_dim 6 is no power of two: the pool turns K/V by a fixed random orthogonal matrix instead."""
    import transformers

    hf_config = transformers.LlamaConfig(vocab_size=97, hidden_size=30, intermediate_size=50, num_hidden_layers=2,
                                         num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=32,
                                         head_dim=6)  # fmt: skip
    torch.manual_seed(0)
    model = slimlm_from_hf(transformers.LlamaForCausalLM(hf_config).eval(), torch.bfloat16)
    reference = copy.deepcopy(model).float()
    prepare_linears(model, "plain")
    tokens = [5, 17, 96, 3, 42, 8, 61, 0, 33]
    cache = Int4PagedKVCache(model.config, num_blocks=4, block_size=4, dtype=torch.bfloat16)
    ref_cache = Int4PagedKVCache(model.config, num_blocks=4, block_size=4, dtype=torch.float32)
    for c in (cache, ref_cache):
        c.prepare_blocks(range(4))
    decoder, _ = FusedDecoder.create(model, cache, max_ctx=16)
    fused = torch.cat([decoder.decode([t], [p], [[3, 1, 2]]) for p, t in enumerate(tokens)])
    expected = paged_decode_logits(reference, ref_cache, tokens, [3, 1, 2])
    assert (fused - expected).abs().max() < 0.02 * expected.abs().max()
    assert torch.equal(fused.argmax(-1), expected.argmax(-1))


def test_kernel_writes_the_pool_the_pytorch_path_reads():
    """K/V written by the kernel sit where the paged cache's own attention finds them."""
    model = slimlm_from_hf(make_hf_model("llama"), torch.bfloat16)
    prepare_linears(model, "plain")
    cache = PagedKVCache(model.config, num_blocks=6, block_size=4, dtype=torch.bfloat16)
    cache.prepare_blocks(range(6))
    decoder, _ = FusedDecoder.create(model, cache, max_ctx=16)
    table, tokens = [4, 1, 3], [5, 17, 99, 3, 42, 8, 61]
    for pos, token in enumerate(tokens[:-1]):
        decoder.decode([token], [pos], [table])
    pos = len(tokens) - 1
    meta = AttnMetadata(
        query_lens=[1],
        context_lens=[pos + 1],
        block_tables=torch.tensor([table]),
        slot_mapping=torch.tensor([table[pos // 4] * 4 + pos % 4]),
    )
    with torch.inference_mode():
        eager = model.compute_logits(model(torch.tensor([tokens[-1]]), torch.tensor([pos]), cache, meta))
    fused = decoder.decode([tokens[-1]], [pos], [table])
    torch.testing.assert_close(fused, eager, atol=0.05 * eager.abs().max().item(), rtol=0)
    assert torch.equal(fused.argmax(-1), eager.argmax(-1))


@pytest.fixture(scope="module")
def smollm_bf16():
    from slimlm.loading import load

    return load(None, dtype="bfloat16", progress=False)


def test_kernel_is_as_close_to_float32_as_pytorch_bf16_on_smollm2(smollm_bf16):
    """SmolLM2, 48 teacher-forced positions: the kernel's logits against a float32 run of the same bf16
    weights, no further off than PyTorch's own bf16 path, and the same top-1 token almost everywhere."""
    model = copy.deepcopy(smollm_bf16)
    reference = copy.deepcopy(smollm_bf16.model).float()
    tokens = smollm_bf16.tokenizer.encode(
        "The three primary colors are red, yellow and blue. Mixing them gives"
    )
    tokens = (tokens * 8)[:48]
    eager_bf16 = _incremental_logits(model.model, tokens)
    prepare_linears(model.model, "plain")
    cache = PagedKVCache(model.config, num_blocks=4, block_size=16, dtype=torch.bfloat16)
    cache.prepare_blocks(range(4))
    decoder, why = FusedDecoder.create(model.model, cache, max_ctx=64)
    assert decoder is not None, why
    fused = torch.cat([decoder.decode([t], [p], [[2, 0, 3]]) for p, t in enumerate(tokens)])
    expected = _incremental_logits(reference, tokens)
    fused_err = (fused - expected).abs().amax(-1)
    torch_err = (eager_bf16 - expected).abs().amax(-1)
    assert fused_err.median() <= 1.25 * torch_err.median()
    assert fused_err.max() < 0.1 * expected.abs().max()
    assert (fused.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95


def test_engine_greedy_on_the_kernel_equals_transformers_float32_on_bf16_weights(smollm_bf16, hf_smollm):
    """Where the float32 greedy path has no near-tie, a bf16 run with correct math reproduces it token for
    token (a wrong block, rotary angle or norm breaks it within a few tokens). Checked here: on these
    prompts the kernel matches all 64 tokens; PyTorch's bf16 path matches 32, 64 and 17."""
    llm = LLM.from_loaded(
        copy.deepcopy(smollm_bf16), weights_layout="plain", max_num_seqs=4, kv_cache_tokens=512
    )
    assert llm.engine.decode_backend == "C kernel" and llm.engine.runner.fused is not None
    reference = copy.deepcopy(hf_smollm)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    prompts = ["Once upon a time", "1, 2, 3,", "The three primary colors are red, yellow and"]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    alone = [llm.generate([llm.encode_prompt(p)], params)[0].token_ids for p in prompts]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert together == alone  # batched steps give each sequence the bits it gets alone
    for prompt, got in zip(prompts, alone, strict=True):
        ids = llm.encode_prompt(prompt)
        ref = reference.generate(
            torch.tensor([ids]), max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0
        )
        assert got == ref[0, len(ids) :].tolist(), prompt
    assert llm.engine.block_manager.num_free_blocks == llm.engine.budget.num_blocks


def test_kernel_after_a_prefix_cache_hit_gives_the_same_tokens(smollm_bf16):
    """The second request prefills only its last partial block and decodes on the kernel as before."""
    llm = LLM.from_loaded(
        copy.deepcopy(smollm_bf16), weights_layout="plain", max_num_seqs=1, kv_cache_tokens=512, block_size=4
    )
    prompt = llm.encode_prompt("List three colours of the rainbow:")
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    first = llm.generate([prompt], params)[0]
    computed = llm.engine.stats.computed_prompt_tokens
    again = llm.generate([prompt], params)[0]
    assert llm.engine.stats.computed_prompt_tokens - computed < len(prompt)  # full blocks came from the cache
    assert again.token_ids == first.token_ids
    assert llm.engine.block_manager.num_free_blocks == llm.engine.budget.num_blocks


def test_kernel_under_a_budget_that_forces_preemption_keeps_the_tokens(smollm_bf16):
    """Six requests in a 96-token pool preempt one another; each resumes by re-prefilling its prefix on
    the PyTorch path, then decodes on the kernel again. (bf16 prefill and the kernel round differently,
    so a near-tie could in principle flip; on these prompts nothing does, and float32 runs are exact:
    tests/engine/test_engine.py.)"""
    from slimlm.bench.workload import REFERENCE_PROMPTS

    model = copy.deepcopy(smollm_bf16)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    roomy = LLM.from_loaded(model, weights_layout="plain", kv_cache_tokens=2048, block_size=8,
                            enable_prefix_caching=False)  # fmt: skip
    expected = [o.token_ids for o in roomy.generate(REFERENCE_PROMPTS, params)]
    tight = LLM.from_loaded(model, kv_cache_tokens=96, block_size=8, enable_prefix_caching=False)
    got = [o.token_ids for o in tight.generate(REFERENCE_PROMPTS, params)]
    assert tight.engine.decode_backend == "C kernel" and tight.engine.stats.preemptions > 0
    assert got == expected
    assert tight.engine.block_manager.num_free_blocks == tight.engine.budget.num_blocks


def test_decode_kernel_choice_and_errors(smollm_bf16, smollm):
    torch_llm = LLM.from_loaded(smollm_bf16, max_num_seqs=1, kv_cache_tokens=64, decode_kernel="torch")
    assert torch_llm.engine.runner.fused is None and torch_llm.engine.decode_backend == "torch (asked for)"
    assert torch_llm.memory_report()["decode_kernel_scratch_bytes"] == 0
    c_llm = LLM.from_loaded(
        copy.deepcopy(smollm_bf16), weights_layout="plain", max_num_seqs=8, kv_cache_tokens=64
    )
    report = c_llm.memory_report()
    assert report["decode_kernel"] == "C kernel" and "decode steps on C kernel" in c_llm.memory_report_text()
    assert report["decode_kernel_scratch_bytes"] == c_llm.engine.runner.fused._work.nbytes > 0
    fp32 = LLM.from_loaded(smollm, kv_cache_tokens=64)  # float32 weights: PyTorch, with the reason
    assert fp32.engine.runner.fused is None
    assert "bf16" in fp32.engine.decode_backend and fp32.memory_report()["decode_kernel"].startswith(
        "torch ("
    )
    with pytest.raises(
        SlimlmError,
        match=r"--decode-kernel c cannot run here: the C decode kernel needs bf16 weights \(this model is float32\)",
    ):
        LLM.from_loaded(smollm, kv_cache_tokens=64, decode_kernel="c")
    with pytest.raises(SlimlmError, match="unknown decode kernel 'fast'; choose one of auto, c, torch"):
        LLM.from_loaded(smollm, kv_cache_tokens=64, decode_kernel="fast")
    fp32_pool = LLM.from_loaded(smollm_bf16, max_num_seqs=1, kv_cache_tokens=64, kv_dtype="fp32")
    assert (
        fp32_pool.engine.runner.fused is None
        and "int8 and int4 paged KV pools" in fp32_pool.engine.decode_backend
    )


def test_cli_rejects_an_unknown_decode_kernel_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "slimlm.cli", "generate", "hi", "--decode-kernel", "gpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "unknown decode kernel 'gpu'; choose one of auto, c, torch" in done.stderr
    assert "Traceback" not in done.stderr


def test_build_caches_by_key_and_reports_a_broken_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_KERNEL_CACHE", str(tmp_path))
    build.load_kernel.cache_clear()
    try:
        assert build.load_kernel("decode_cpu") is not None
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].name.startswith("decode_cpu-") and built[0].suffix == ".so"
        build.load_kernel.cache_clear()
        monkeypatch.setenv("CC", "false")  # a compiler that always fails: different key, no library
        assert build.load_kernel("decode_cpu") is None
        assert build.kernel_unavailable_reason("decode_cpu").startswith("false failed on decode_cpu.c")
        assert list(tmp_path.iterdir()) == built  # no half-written file left behind
        build.load_kernel.cache_clear()
        monkeypatch.delenv("CC")
        monkeypatch.setenv("SLIMLM_NO_C_KERNELS", "1")
        assert build.load_kernel("decode_cpu") is None
        assert "SLIMLM_NO_C_KERNELS" in build.kernel_unavailable_reason("decode_cpu")
    finally:
        build.load_kernel.cache_clear()


def test_a_changed_header_builds_a_new_library(tmp_path, monkeypatch):
    import shutil

    sources = tmp_path / "src"
    shutil.copytree(build.SOURCE_DIR, sources, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    monkeypatch.setenv("SLIMLM_KERNEL_CACHE", str(tmp_path / "cache"))
    build.load_kernel.cache_clear()
    try:
        assert build.load_kernel("decode_cpu") is not None
        with open(sources / "gemm.h", "a") as f:
            f.write("\n/* edited */\n")
        build.load_kernel.cache_clear()
        assert build.load_kernel("decode_cpu") is not None
        assert len(list((tmp_path / "cache").glob("decode_cpu-*.so"))) == 2
    finally:
        build.load_kernel.cache_clear()


def test_portable_build_without_avx512_is_correct_but_never_picked_automatically(tmp_path, monkeypatch):
    """CPUs without AVX512-BF16 get the plain C loops: same answers, used only with --decode-kernel c."""
    monkeypatch.setenv("SLIMLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("SLIMLM_KERNEL_CFLAGS", "-mno-avx512f")
    build.load_kernel.cache_clear()
    try:
        hf = make_hf_model("qwen2")
        model = slimlm_from_hf(hf, torch.bfloat16)
        reference = copy.deepcopy(model).float()
        prepare_linears(model, "plain")
        cache = PagedKVCache(model.config, num_blocks=8, block_size=4, dtype=torch.bfloat16)
        cache.prepare_blocks(range(8))
        decoder, why = FusedDecoder.create(model, cache, max_ctx=32, require_fast=True)
        assert decoder is None and "AVX512-BF16" in why
        decoder, why = FusedDecoder.create(model, cache, max_ctx=32, max_batch=2)
        assert why == "C kernel (portable)"
        tokens = [3, 99, 41, 7, 120, 56, 2, 88, 64, 15]
        fused = torch.cat([decoder.decode([t], [p], [[5, 1, 6]]) for p, t in enumerate(tokens)])
        expected = _incremental_logits(reference, tokens)
        assert (fused - expected).abs().max() < 0.02 * expected.abs().max()
        assert torch.equal(fused.argmax(-1), expected.argmax(-1))
    finally:
        build.load_kernel.cache_clear()


def test_kernel_refuses_positions_outside_its_table():
    config = ModelConfig.from_hf_dict(make_hf_model("llama").config.to_dict())
    model = slimlm_from_hf(make_hf_model("llama"), torch.bfloat16)
    prepare_linears(model, "plain")
    cache = PagedKVCache(config, num_blocks=4, block_size=4, dtype=torch.bfloat16)
    decoder, _ = FusedDecoder.create(model, cache, max_ctx=8, max_batch=2)
    with pytest.raises(ValueError, match=r"refused positions \[8\]"):
        decoder.decode([3], [8], [[0, 1]])  # past max_ctx
    with pytest.raises(ValueError, match=r"refused positions \[1, 5\]"):
        decoder.decode([3, 3], [1, 5], [[0], [2]])  # block 1 of the second sequence is not in its table
    with pytest.raises(ValueError, match=r"refused positions \[1\]"):
        decoder.decode([3], [1], [[4]])  # the pool has blocks 0-3 only: never read or written outside it
    with pytest.raises(ValueError, match="scratch for 2 sequences, got 3"):
        decoder.decode([3, 3, 3], [1, 1, 1], [[0], [1], [2]])
