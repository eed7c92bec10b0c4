"""The C decode kernel on Qwen3, Phi-3 and Gemma 3 (kernels/family.py fills what they change) against
float32 runs of the same weights, on tiny random checkpoints with the awkward settings: a sliding window
shorter than the prompt, final-logit soft-capping, head_dim 256, one KV head, Phi-3's longrope past its
original length, Gemma's two RoPE bases."""

from __future__ import annotations

import copy

import pytest
import torch

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.kernels import build
from slimlm.kernels.fused_decode import FusedDecoder
from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
from slimlm.kv.paged import PagedKVCache
from slimlm.kv.quantized import Int4PagedKVCache, Int8PagedKVCache, K8V4PagedKVCache
from slimlm.loading import LoadedModel
from slimlm.models.prepack import prepare_linears
from slimlm.quant.quantize import quantize_model
from tests.engine.test_decode_kernel import _incremental_logits
from tests.engine.test_decode_kernel_quant import dequantized_reference, kernel_decoder
from tests.tiny_models import make_hf_model, paged_decode_logits, slimlm_from_hf

pytestmark = pytest.mark.skipif(
    build.load_kernel("decode_cpu") is None,
    reason=f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}",
)

ARCHS = ["qwen3", "phi3", "gemma3", "gemma3-plain"]
TABLE = [9, 2, 11, 0, 5, 7]


def _tokens(n: int = 20) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def _bf16(arch: str):
    model = slimlm_from_hf(make_hf_model(arch), torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the same bf16-rounded weights, float32 math
    prepare_linears(model, "plain")
    return model, reference


def _check(fused, expected, eager_bf16=None, slack=1.0, rel=0.02):
    """Within `rel` of the largest logit and no further off than `slack` times PyTorch's bf16 path (which
    rounds every activation); quantized pools flip a code where a value sits on a rounding boundary,
    which either path may hit, hence their slack."""
    err = (fused - expected).abs().max()
    assert err < rel * expected.abs().max()
    if eager_bf16 is not None:
        assert err <= slack * (eager_bf16 - expected).abs().max()
    # Same greedy token, except where the reference's top two are closer than the kernel's error
    # (random tiny models over quantized pools have such near-ties).
    picked = expected.gather(-1, fused.argmax(-1, keepdim=True)).squeeze(-1)
    assert (expected.amax(-1) - picked <= 2 * err).all()
    assert (fused.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_logits_match_a_float32_run_of_the_same_weights(arch, block_size):
    """20 tokens: Gemma's windows (8, 6) are crossed, Phi-3 passes its original length (16)."""
    model, reference = _bf16(arch)
    tokens = _tokens()
    cache = PagedKVCache(model.config, num_blocks=12, block_size=block_size, dtype=torch.bfloat16)
    cache.prepare_blocks(range(12))
    decoder, why = FusedDecoder.create(model, cache, max_ctx=32)
    assert decoder is not None and why == "C kernel", why
    fused = torch.cat([decoder.decode([t], [p], [TABLE]) for p, t in enumerate(tokens)])
    _check(fused, _incremental_logits(reference, tokens), _incremental_logits(model, tokens))


def test_soft_capping_and_the_local_rope_are_really_applied():
    """The soft-capped tiny Gemma's logits stay inside the cap, and a kernel without the local RoPE base
    (both layer kinds on the global one) disagrees with the reference: the per-layer fields matter."""
    model, reference = _bf16("gemma3")
    cache = PagedKVCache(model.config, num_blocks=12, block_size=4, dtype=torch.bfloat16)
    cache.prepare_blocks(range(12))
    decoder, _ = FusedDecoder.create(model, cache, max_ctx=32)
    tokens = _tokens()
    fused = torch.cat([decoder.decode([t], [p], [TABLE]) for p, t in enumerate(tokens)])
    assert fused.abs().max() <= model.config.final_logit_softcapping
    for i in range(model.config.num_hidden_layers):
        decoder._layers[i].rope = 0
    wrong = torch.cat([decoder.decode([t], [p], [TABLE]) for p, t in enumerate(tokens)])
    expected = _incremental_logits(reference, tokens)
    assert (wrong - expected).abs().max() > 5 * (fused - expected).abs().max()


@pytest.mark.parametrize("pool", [Int8PagedKVCache, Int4PagedKVCache, K8V4PagedKVCache])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_kernel_on_quantized_kv_pools(arch, pool):
    """Against a float32 model over the same kind of pool (head_dim 256 turned by its Hadamard)."""
    model, reference = _bf16(arch)
    tokens = _tokens()

    def pool_of(dtype):
        cache = pool(model.config, num_blocks=12, block_size=4, dtype=dtype)
        cache.prepare_blocks(range(12))
        return cache

    decoder, why = FusedDecoder.create(model, pool_of(torch.bfloat16), max_ctx=32)
    assert why == "C kernel"
    fused = torch.cat([decoder.decode([t], [p], [TABLE]) for p, t in enumerate(tokens)])
    expected = paged_decode_logits(reference, pool_of(torch.float32), tokens, TABLE)
    eager_bf16 = paged_decode_logits(model, pool_of(torch.bfloat16), tokens, TABLE)
    _check(fused, expected, eager_bf16, slack=3.0, rel=0.15)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_a_sequence_gets_the_same_bits_whatever_else_is_in_the_batch(arch):
    model, _ = _bf16(arch)
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 17, 1, 9, 14, 3, 11, 2, 7, 16]
    n = len(lengths)
    prompts = [torch.randint(0, 128, (k,), generator=gen).tolist() for k in lengths]
    tables = [[5 * i + j for j in range(5)] for i in range(n)]
    cache = PagedKVCache(model.config, num_blocks=5 * n, block_size=4, dtype=torch.bfloat16)
    cache.prepare_blocks(range(5 * n))
    decoder, _ = FusedDecoder.create(model, cache, max_ctx=20, max_batch=n)
    together = {}
    for pos in range(max(lengths)):
        live = [i for i in range(n) if pos < lengths[i]]
        out = decoder.decode([prompts[i][pos] for i in live], [pos] * len(live), [tables[i] for i in live])
        together.update({i: out[j] for j, i in enumerate(live) if pos == lengths[i] - 1})
    for i in (0, 1, 4, 9):
        alone = [decoder.decode([t], [p], [tables[i]])[0] for p, t in enumerate(prompts[i])]
        assert torch.equal(alone[-1], together[i])


@pytest.mark.parametrize("bits,group", [(4, 32), (8, -1)])
@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gemma3"])
def test_quantized_weights_and_embedding_on_the_kernel(arch, bits, group):
    """RTN int4/int8 with the (tied) embedding quantized: the kernel's scaled lookup and head."""
    model = slimlm_from_hf(make_hf_model(arch), torch.float32)
    quantize_model(model, "rtn", bits, group, None, progress=False, quantize_embeddings=True)
    model = model.to(torch.bfloat16)
    reference = dequantized_reference(model)
    decoder, _ = kernel_decoder(model, num_blocks=12)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, KernelLinear)
    assert isinstance(model.model.embed_tokens, KernelEmbedding)
    tokens = _tokens()
    fused = torch.cat([decoder.decode([t], [p], [TABLE]) for p, t in enumerate(tokens)])
    # The int4/int8 GEMMs also take their inputs as int8 codes per 32 (gemm_q.h): a few % of the top logit
    _check(fused, _incremental_logits(reference, tokens), rel=0.05)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from slimlm.tokenizer import Tokenizer
    from tests.test_loading import _write_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    _write_tiny_tokenizer(path)
    return Tokenizer.from_hf_dir(path)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_engine_greedy_text_on_the_kernel_equals_the_float32_engine(arch, tokenizer):
    """The engine picks the kernel by itself and its greedy tokens equal a float32 run of the same
    bf16 weights on the PyTorch path, batched and alone."""
    model, reference = _bf16(arch)
    loaded = LoadedModel(model, model.config, tokenizer)
    llm = LLM.from_loaded(loaded, weights_layout="plain", max_num_seqs=4, kv_cache_tokens=256, block_size=4)
    assert llm.engine.decode_backend == "C kernel" and llm.engine.runner.fused is not None
    ref = LLM.from_loaded(LoadedModel(reference, reference.config, tokenizer), max_num_seqs=4,
                          kv_cache_tokens=256, block_size=4, decode_kernel="torch")  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 128, (k,), generator=gen).tolist() for k in (3, 11, 6)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == [llm.generate([p], params)[0].token_ids for p in prompts]
    assert got == [o.token_ids for o in ref.generate(prompts, params)]
