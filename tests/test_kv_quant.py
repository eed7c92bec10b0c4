"""Quantized KV cache: quantize/dequantize bounds, int4 packing, byte accounting, attention through the pool."""

from __future__ import annotations

import argparse

import pytest
import torch

from slimlm.config import ModelConfig
from slimlm.engine.config import EngineConfig, kv_dtype_from_quant_policy
from slimlm.errors import SlimlmError
from slimlm.kv import kv_cache_class, make_kv_cache
from slimlm.kv.metadata import AttnMetadata
from slimlm.kv.paged import PagedKVCache
from slimlm.kv.quant_ops import check_bits, dequantize, pack_int4, quantize, rotation_matrix, unpack_int4
from slimlm.kv.quantized import Int4PagedKVCache, Int8PagedKVCache, K8V4PagedKVCache

BITS = [8, 4]


def tiny_config(head_dim: int = 32, layers: int = 2, kv_heads: int = 2, heads: int = 4) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
    )


# SmolLM2-135M's KV shape: 30 layers, 3 KV heads, head_dim 64.
SMOLLM_SHAPE = tiny_config(head_dim=64, layers=30, kv_heads=3, heads=9)


# ---- quantize / dequantize ----
@pytest.mark.parametrize("bits", BITS)
def test_values_on_the_grid_round_trip_exactly(bits):
    # x = (q - z) * s with s a power of two and the codes spanning [0, levels]: exactly representable.
    levels = 2**bits - 1
    gen = torch.Generator().manual_seed(0)
    zero = torch.randint(1, levels, (5, 3), generator=gen)
    codes = torch.randint(0, levels + 1, (5, 3, 16), generator=gen)
    codes[..., 0], codes[..., 1] = 0, levels  # min and max define the grid
    scale = 2.0 ** -torch.randint(0, 6, (5, 3), generator=gen).float()
    x = (codes - zero[..., None]).float() * scale[..., None]
    q, s, z = quantize(x, bits)
    assert torch.equal(s.float(), scale)
    assert torch.equal(z.long(), zero)
    assert torch.equal(dequantize(q, s, z, bits, torch.float32), x)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("magnitude", [0.05, 1.0, 300.0])
def test_error_is_about_half_a_step(bits, magnitude):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, 64, generator=gen) * magnitude + 0.3 * magnitude  # off-centre, both signs
    q, s, z = quantize(x, bits)
    levels = 2**bits - 1
    assert q.dtype == torch.uint8 and q.shape[-1] == 64 * bits // 8
    span = x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)
    # The stored scale is (max - min) / levels rounded to fp16.
    assert torch.allclose(s.float(), span / levels, rtol=2**-10, atol=0)
    err = (dequantize(q, s, z, bits, torch.float32) - x).abs()
    # Half a step from rounding, plus at most levels * 2^-11 steps where fp16 rounding shortened the scale.
    bound = (0.5 + levels * 2**-11 + 1e-3) * s.float()
    assert (err <= bound[..., None]).all()
    assert err.mean() < 0.3 * s.float().mean()  # and rounding errors are spread, not all at the bound


@pytest.mark.parametrize("bits", BITS)
def test_constant_and_zero_vectors_stay_finite(bits):
    x = torch.stack([torch.zeros(8), torch.full((8,), 2.5), torch.full((8,), -7.0)])
    q, s, z = quantize(x, bits)
    back = dequantize(q, s, z, bits, torch.float32)
    assert torch.isfinite(back).all()
    assert torch.allclose(back, x, rtol=2**-10, atol=1e-6)  # only the scale's fp16 rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_to_half_precision_matches_float32(dtype):
    x = torch.randn(32, 2, 64, generator=torch.Generator().manual_seed(2))
    q, s, z = quantize(x, 8)
    ref = dequantize(q, s, z, 8, torch.float32)
    out = dequantize(q, s, z, 8, dtype)
    assert out.dtype == dtype
    assert torch.allclose(out.float(), ref, rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_int4_packing_round_trip_and_layout():
    codes = torch.randint(0, 16, (7, 3, 64), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 3, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    # element i sits in the low nibble of byte i, element i + D/2 in the high nibble
    assert torch.equal(packed[..., 5] % 16, codes[..., 5])
    assert torch.equal(packed[..., 5] // 16, codes[..., 37])
    every_byte = torch.arange(256, dtype=torch.uint8)[None, :]
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


@pytest.mark.parametrize("head_dim", [64, 80])
def test_rotation_is_orthogonal(head_dim):
    rot = rotation_matrix(head_dim)
    torch.testing.assert_close(rot @ rot.T, torch.eye(head_dim), atol=1e-5, rtol=0)
    assert torch.equal(rot, rotation_matrix(head_dim))  # fixed: the same matrix for every pool


def test_rotation_spreads_outlier_channels():
    # K-like vectors: Gaussian channels plus two channels ~20x larger that set every vector's range.
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(6))
    x[:, 3] *= 20
    x[:, 40] *= -15
    rot = rotation_matrix(64)

    def error(v):
        return (dequantize(*quantize(v, 4), 4, torch.float32) - v).norm()

    assert error(x @ rot) < 0.5 * error(x)  # the norm of the error survives the (orthogonal) turn back


# ---- byte accounting ----
@pytest.mark.parametrize(
    "cls, k_bytes, v_bytes",
    # per token and head: head_dim code bytes + an fp16 scale and a uint8 zero per scale group
    [
        (Int8PagedKVCache, 32 + 3, 32 + 3),
        (K8V4PagedKVCache, 32 + 3, 16 + 3),
    ],
)
def test_bytes_per_block_is_exact_and_counts_scales(cls, k_bytes, v_bytes):
    config = tiny_config(head_dim=32, layers=3, kv_heads=2)
    cache = cls(config, num_blocks=5, block_size=4)
    expected = 3 * 4 * 2 * (k_bytes + v_bytes)  # layers x block slots x heads
    assert cls.bytes_per_block(config, 4, torch.float32) == expected
    assert cache.nbytes == 5 * expected
    # every tensor the pool holds is counted, except the fixed [D, D] rotation, which is not per block
    held = [t for name, t in vars(cache).items() if torch.is_tensor(t) and name != "rotation"]
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in held)


@pytest.mark.parametrize("kv_dtype, floor", [("int8", 1.9), ("int4", 3.2), ("k8v4", 2.45)])
def test_smollm_capacity_ratio_over_bf16(kv_dtype, floor):
    budget = 64 * 2**20
    bf16 = budget // PagedKVCache.bytes_per_block(SMOLLM_SHAPE, 16, torch.bfloat16)
    quant = budget // kv_cache_class(kv_dtype).bytes_per_block(SMOLLM_SHAPE, 16, torch.bfloat16)
    assert quant / bf16 >= floor


def test_planner_agrees_with_the_cache_bytes():
    inference = pytest.importorskip("slimlm.plan.inference")
    for kv_dtype in ("int8", "int4", "k8v4", "bf16"):
        for block_size in (1, 16, 32):
            exact = kv_cache_class(kv_dtype).bytes_per_block(SMOLLM_SHAPE, block_size, torch.bfloat16)
            assert inference.kv_block_bytes(SMOLLM_SHAPE, kv_dtype, block_size) == exact, kv_dtype
            assert inference.kv_bytes_per_token(SMOLLM_SHAPE, kv_dtype, block_size) == exact / block_size


# ---- attention through the pool ----
def _steps(num_seqs: int, prompt_lens: list[int], decode_steps: int, block_size: int):
    """Yields (query_lens, context_lens, block_tables, slot_mapping) for one prefill then decode steps."""
    blocks_per_seq = -(-(max(prompt_lens) + decode_steps) // block_size)
    # Interleaved block ids, so that sequences do not own contiguous ranges.
    tables = torch.arange(num_seqs * blocks_per_seq).view(blocks_per_seq, num_seqs).t().contiguous()
    lens = list(prompt_lens)
    starts = [0] * num_seqs
    for _ in range(decode_steps + 1):
        slots = []
        for i in range(num_seqs):
            for p in range(starts[i], lens[i]):
                slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
        query_lens = [lens[i] - starts[i] for i in range(num_seqs)]
        needed = -(-max(lens) // block_size)
        yield query_lens, list(lens), tables[:, :needed], torch.tensor(slots)
        starts = list(lens)
        lens = [n + 1 for n in lens]


def _run(cache, qkv_steps, config, steps):
    outs = []
    for (q, k, v), (query_lens, context_lens, tables, slots) in zip(qkv_steps, steps, strict=True):
        # As the runner does: blocks are zeroed on first use (a fresh pool is torch.empty).
        cache.prepare_blocks(tables.clamp(min=0).flatten().tolist())
        per_layer = []
        for layer in range(config.num_hidden_layers):
            meta = AttnMetadata(query_lens, context_lens, block_tables=tables, slot_mapping=slots)
            per_layer.append(cache.attend(layer, q[layer], k[layer], v[layer], meta))
        outs.append(torch.stack(per_layer))
    return outs


def _random_qkv(config, steps, gen):
    qkv = []
    for query_lens, *_ in steps:
        t, layers = sum(query_lens), config.num_hidden_layers
        q = torch.randn(layers, t, config.num_attention_heads, config.head_dim, generator=gen)
        k = torch.randn(layers, t, config.num_key_value_heads, config.head_dim, generator=gen) * 2 + 0.5
        v = torch.randn(layers, t, config.num_key_value_heads, config.head_dim, generator=gen)
        qkv.append((q, k, v))
    return qkv


@pytest.mark.parametrize("cls, bits, tol", [(Int8PagedKVCache, 8, 0.02), (K8V4PagedKVCache, 4, 0.3)])
def test_quantized_pool_attends_like_the_float_pool(cls, bits, tol):
    config = tiny_config()
    block_size, prompt_lens, decode_steps = 4, [9, 3, 14], 6
    steps = list(_steps(3, prompt_lens, decode_steps, block_size))
    qkv = _random_qkv(config, steps, torch.Generator().manual_seed(4))
    num_blocks = 3 * -(-(max(prompt_lens) + decode_steps) // block_size)

    quant = _run(cls(config, num_blocks, block_size), qkv, config, steps)
    exact = _run(PagedKVCache(config, num_blocks, block_size), qkv, config, steps)

    # Feeding the float pool K/V that went through turn -> quantize -> dequantize -> turn back must give
    # the same outputs: the quantized pool stores exactly that and attends with nothing else.
    rot = rotation_matrix(config.head_dim)

    fmt = cls.format
    k_group, v_group = fmt.groups(config.head_dim)

    def roundtrip(x, bits, group):
        return dequantize(*quantize(x @ rot, bits, group), bits, torch.float32) @ rot.T

    rounded = [(q, roundtrip(k, fmt.k_bits, k_group), roundtrip(v, fmt.v_bits, v_group)) for q, k, v in qkv]
    through_float = _run(PagedKVCache(config, num_blocks, block_size), rounded, config, steps)
    for got, ref, approx in zip(quant, through_float, exact, strict=True):
        assert got.shape == approx.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        rel = (got - approx).norm() / approx.norm()
        assert rel < tol
        assert rel > 0  # quantization did happen


def test_decode_over_padded_tables_reads_no_nan():
    # Sequence 0 is longer, so sequence 1's table is padded with -1 (read as block 0, then masked).
    config = tiny_config()
    steps = list(_steps(2, [11, 2], 3, block_size=4))
    qkv = _random_qkv(config, steps, torch.Generator().manual_seed(5))
    for out in _run(Int4PagedKVCache(config, 16, 4), qkv, config, steps):
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_make_kv_cache_builds_the_quantized_pool(compute_dtype):
    cache = make_kv_cache(tiny_config(), 4, 8, "int8", compute_dtype, "cpu")
    assert isinstance(cache, Int8PagedKVCache) and cache.kv_dtype == "int8"
    assert cache.compute_dtype == compute_dtype
    k, v = cache._load(0, torch.tensor([0, 1]))
    assert k.dtype == v.dtype == compute_dtype and k.shape == (2, 16, 32)  # [KVH, tokens, D]


# ---- bad input ----
def test_unknown_kv_dtype_or_policy_is_a_clear_error():
    with pytest.raises(SlimlmError, match="unknown KV dtype 'int3'"):
        kv_cache_class("int3")
    with pytest.raises(SlimlmError, match="unknown KV dtype 'q8'"):
        EngineConfig(kv_dtype="q8")
    with pytest.raises(SlimlmError, match="unknown quant_policy 2"):
        kv_dtype_from_quant_policy(2)
    assert [kv_dtype_from_quant_policy(p) for p in (0, 8, 4)] == ["auto", "int8", "int4"]


def test_cli_flags_pick_the_quantized_cache_and_reject_contradictions():
    from slimlm.commands.common import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args(["--quant-policy", "4"])).kv_dtype == "int4"
    assert engine_config_from_args(parser.parse_args(["--kv-dtype", "int8"])).kv_dtype == "int8"
    with pytest.raises(SlimlmError, match="contradicts"):
        engine_config_from_args(parser.parse_args(["--kv-dtype", "int8", "--quant-policy", "4"]))
    with pytest.raises(SlimlmError, match="quant_policy"):
        engine_config_from_args(parser.parse_args(["--quant-policy", "3"]))


def test_int4_needs_an_even_head_dim():
    # ModelConfig already demands an even head_dim (RoPE); the KV check guards direct use of the ops.
    with pytest.raises(SlimlmError, match="even head_dim"):
        check_bits(4, 33)
    with pytest.raises(SlimlmError, match="8 or 4 bits"):
        check_bits(2, 64)
    check_bits(8, 33)
