"""The C decode kernel on int4/int8 weights (kernels/gemm_q.h) against float32 runs of the dequantized
weights, batch invariance, act-order, the PyTorch path on the same buffers, and the fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimlm.config import ModelConfig
from slimlm.engine.backend import choose_backend
from slimlm.engine.config import EngineConfig
from slimlm.errors import SlimlmError
from slimlm.kernels import build
from slimlm.kernels.fused_decode import FusedDecoder
from slimlm.kernels.qlayout import quantized_reason, to_kernel_layout
from slimlm.kernels.qlinear import KernelEmbedding, KernelLinear
from slimlm.kernels.qweights import dequantize, pack, unpack
from slimlm.kv.contiguous import ContiguousKVCache
from slimlm.kv.metadata import AttnMetadata
from slimlm.kv.paged import PagedKVCache
from slimlm.models import build_model
from slimlm.models.prepack import prepare_linears
from slimlm.quant.embedding import QuantEmbedding
from slimlm.quant.linear import QuantLinear
from slimlm.quant.quantize import quantize_model

pytestmark = pytest.mark.skipif(
    build.load_kernel("decode_cpu") is None,
    reason=f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}",
)

FAMILIES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


def tiny(family: str, tied: bool = True, hidden: int = 128, inter: int = 256, seed: int = 0):
    """A random HF model of the family, wide enough for groups of 128, as a float32 slimlm model."""
    import transformers

    extra = {"sliding_window": 12} if family == "mistral" else {}
    hf_config = getattr(transformers, FAMILIES[family])(
        vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = getattr(transformers, FAMILIES[family].replace("Config", "ForCausalLM"))(hf_config).eval()
    model = build_model(ModelConfig.from_hf_dict(hf.config.to_dict()), torch.float32)
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}, strict=False)
    return model


def dequantized_reference(model: nn.Module) -> nn.Module:
    """A float32 copy whose linears and embedding hold the quantized model's dequantized weights."""
    ref = copy.deepcopy(model)
    if isinstance(ref.model.embed_tokens, QuantEmbedding):
        e = ref.model.embed_tokens
        emb = nn.Embedding(e.num_embeddings, e.embedding_dim)
        emb.weight = nn.Parameter(e.dequantized_table(torch.float32))
        ref.model.embed_tokens = emb
        if e.tied:
            ref.lm_head = nn.Linear(e.embedding_dim, e.num_embeddings, bias=False)
            ref.lm_head.weight = emb.weight
    for name, m in list(ref.named_modules()):
        if isinstance(m, QuantLinear):
            parent, _, child = name.rpartition(".")
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight = nn.Parameter(m.dequantized_weight(torch.float32))
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.float())
            setattr(ref.get_submodule(parent) if parent else ref, child, lin)
    return ref.float()


def incremental_logits(model, tokens: list[int]) -> torch.Tensor:
    cache = ContiguousKVCache(model.config, 1, len(tokens), dtype=model.model.norm.weight.dtype)
    rows = []
    with torch.inference_mode():
        for pos, token in enumerate(tokens):
            hidden = model(torch.tensor([token]), torch.tensor([pos]), cache, AttnMetadata.single(1, pos + 1))
            rows.append(model.compute_logits(hidden)[0].float())
    return torch.stack(rows)


def quantized(family="llama", bits=4, group=32, embeddings=True, tied=True, method="rtn", act_order=False):
    model = tiny(family, tied)
    calib = None
    if method != "rtn":
        calib = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    quantize_model(model, method, bits, group, calib, progress=False, quantize_embeddings=embeddings,
                   act_order=act_order)  # fmt: skip
    return model.to(torch.bfloat16)


def kernel_decoder(model, max_batch=1, num_blocks=12, block_size=4, require_fast=False):
    assert quantized_reason(model) is None
    to_kernel_layout(model)
    prepare_linears(model, "plain")
    cache = PagedKVCache(model.config, num_blocks=num_blocks, block_size=block_size, dtype=torch.bfloat16)
    cache.prepare_blocks(range(num_blocks))
    decoder, why = FusedDecoder.create(
        model, cache, max_ctx=48, max_batch=max_batch, require_fast=require_fast
    )
    assert decoder is not None, why
    return decoder, why


TOKENS = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(1)).tolist()
TABLE = [9, 2, 11, 0, 5]


def check_against_reference(reference, decoder):
    """`reference`: dequantized_reference() of the model before the kernel took its weights."""
    fused = torch.cat([decoder.decode([t], [p], [TABLE]) for p, t in enumerate(TOKENS)])
    expected = incremental_logits(reference, TOKENS)
    assert (fused - expected).abs().max() < 0.02 * expected.abs().max()
    assert torch.equal(fused.argmax(-1), expected.argmax(-1))
    return fused


def test_pack_is_exact_and_keeps_fp16_scales_only_where_exact():
    gen = torch.Generator().manual_seed(0)
    for bits, group, rows, k in [(4, 32, 40, 64), (8, 64, 17, 128), (4, 128, 16, 256), (8, 96, 5, 96)]:
        codes = torch.randint(0, 2**bits, (rows, k), generator=gen, dtype=torch.uint8)
        d, m = torch.rand(rows, k // group, generator=gen), torch.randn(rows, k // group, generator=gen)
        for exact16 in (False, True):
            if exact16:
                d, m = d.half().float(), m.half().float()
            w = pack(codes, d, m, bits, group)
            assert w.scales.dtype == (torch.float16 if exact16 else torch.float32)
            got = unpack(w)
            assert torch.equal(got[0], codes) and torch.equal(got[1], d) and torch.equal(got[2], m)
    with pytest.raises(ValueError, match="groups of 32, 64, 128"):
        pack(torch.zeros(16, 96, dtype=torch.uint8), torch.ones(16, 6), torch.zeros(16, 6), 4, 16)


@pytest.mark.parametrize(
    "family,bits,group,embeddings",
    [
        ("llama", 4, 32, True),
        ("llama", 4, 64, True),
        ("llama", 4, 128, False),
        ("llama", 8, -1, True),
        ("mistral", 4, 64, True),
        ("qwen2", 4, 32, True),
        ("qwen2", 8, -1, False),
    ],
)
def test_kernel_logits_on_quantized_weights_match_float32_on_the_dequantized_weights(
    family, bits, group, embeddings
):
    """Every position through a shuffled block table; mistral crosses its window, qwen2 has the bias."""
    model = quantized(family, bits, group, embeddings)
    reference = dequantized_reference(model)
    decoder, _ = kernel_decoder(model)
    check_against_reference(reference, decoder)
    head = model.lm_head
    assert isinstance(head, KernelLinear) == embeddings
    assert isinstance(model.model.embed_tokens, KernelEmbedding) == embeddings


def test_untied_quantized_head_and_gptq_act_order():
    model = quantized("llama", 4, 32, embeddings=True, tied=False, method="gptq", act_order=True)
    assert model.model.layers[0].self_attn.q_proj.perm is not None  # act-order permutes the inputs
    reference = dequantized_reference(model)
    decoder, _ = kernel_decoder(model)
    assert model.model.layers[0].self_attn.qkv_proj.perm is not None
    assert isinstance(model.lm_head, KernelLinear) and not model.model.embed_tokens.tied
    check_against_reference(reference, decoder)


def test_awq_lookup_scale_on_a_tied_head():
    model = quantized("llama", 4, 32, embeddings=True, method="awq")
    reference = dequantized_reference(model)
    decoder, _ = kernel_decoder(model)
    check_against_reference(reference, decoder)


@pytest.mark.parametrize("bits,group", [(4, 64), (8, -1)])
def test_a_sequence_gets_the_same_bits_whatever_else_is_in_the_batch(bits, group):
    """16 sequences (two tiles of 8), then fewer as they finish; each also runs alone."""
    model = quantized("qwen2", bits, group)
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 12, 1, 9, 11, 3, 7, 2, 6, 10, 4, 8, 12, 1, 5, 9]
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    n = len(seqs)
    decoder, _ = kernel_decoder(model, max_batch=n, num_blocks=4 * n, block_size=4)
    tables = [[4 * i + j for j in range(4)] for i in range(n)]
    together = {i: [] for i in range(n)}
    for pos in range(max(lengths)):
        live = [i for i in range(n) if pos < lengths[i]]
        out = decoder.decode([seqs[i][pos] for i in live], [pos] * len(live), [tables[i] for i in live])
        for row, i in zip(out, live, strict=True):
            together[i].append(row)
    for i in (0, 2, 5, 12):
        alone = [decoder.decode([t], [p], [tables[i]])[0] for p, t in enumerate(seqs[i])]
        assert torch.equal(torch.stack(alone), torch.stack(together[i]))


def test_pytorch_path_reads_the_same_buffers_for_prefill():
    """KernelLinear / KernelEmbedding: the prefill path on the kernel's one copy of the weights."""
    model = quantized("llama", 4, 32, embeddings=True)
    reference = dequantized_reference(model)
    to_kernel_layout(model)
    assert not any(isinstance(m, QuantLinear | QuantEmbedding) for m in model.modules())  # one copy
    qkv = model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(7, 128)
    ref_w = torch.cat(
        [reference.model.layers[0].self_attn.get_submodule(p).weight for p in ("q_proj", "k_proj", "v_proj")]
    )
    torch.testing.assert_close(dequantize(qkv.kernel_weight()), ref_w, rtol=0, atol=0)
    y = qkv(x)
    assert (y - x @ ref_w.T).abs().max() < 0.02 * (x @ ref_w.T).abs().max()
    ids = torch.tensor([[3, 200, 17]])
    torch.testing.assert_close(model.model.embed_tokens(ids).float(), reference.model.embed_tokens(ids).to(torch.bfloat16).float(),
                               rtol=0.01, atol=1e-6)  # fmt: skip
    got = incremental_logits(model, TOKENS[:8])
    expected = incremental_logits(reference, TOKENS[:8])
    assert (got - expected).abs().max() < 0.03 * expected.abs().max()


def test_backend_repacks_once_and_reports_the_format():
    model = quantized("llama", 4, 64)
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4, dtype=torch.bfloat16)
    backend = choose_backend(model, cache, EngineConfig(), max_ctx=32)
    assert backend.decoder is not None and backend.description.startswith("C kernel")
    assert "int4 g64" in backend.weights and backend.weights_layout == "plain"
    as_loaded = quantized("llama", 4, 64)
    kept = choose_backend(as_loaded, cache, EngineConfig(weights_layout="as loaded"), max_ctx=32)
    assert kept.decoder is None and "lays the weights out" in kept.description
    assert any(isinstance(m, QuantLinear) for m in as_loaded.modules())  # the caller's model untouched


def test_shapes_the_kernel_cannot_run_fall_back_with_the_reason():
    """80 inputs are not whole 32-blocks: PyTorch runs it, the report says why, `c` is a one-line error."""
    model = tiny("llama", hidden=80, inter=160)
    quantize_model(model, "rtn", 8, -1, None, progress=False, quantize_embeddings=False)
    model = model.to(torch.bfloat16)
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4, dtype=torch.bfloat16)
    backend = choose_backend(model, cache, EngineConfig(), max_ctx=32)
    assert backend.decoder is None and "multiples of 32" in backend.description
    assert backend.description.startswith("torch (")
    with pytest.raises(SlimlmError, match=r"^--decode-kernel c cannot run here: .*multiples of 32"):
        choose_backend(model, cache, EngineConfig(decode_kernel="c"), max_ctx=32)


def test_portable_build_without_vnni_falls_back_in_auto_and_runs_when_forced(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("SLIMLM_KERNEL_CFLAGS", "-mno-avx512f")
    build.load_kernel.cache_clear()
    try:
        model = quantized("llama", 4, 32)
        cache = PagedKVCache(model.config, num_blocks=12, block_size=4, dtype=torch.bfloat16)
        backend = choose_backend(copy.deepcopy(model), cache, EngineConfig(), max_ctx=32)
        assert backend.decoder is None and "AVX512-VNNI" in backend.description
        reference = dequantized_reference(model)
        decoder, why = kernel_decoder(model)
        assert why == "C kernel (portable)"
        check_against_reference(reference, decoder)
    finally:
        build.load_kernel.cache_clear()
