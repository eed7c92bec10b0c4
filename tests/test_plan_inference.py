"""Inference planning: exact weight and KV bytes, the engine's KV budget, capacity and the verdict."""

from __future__ import annotations

import pytest
import torch

from slimlm.engine.config import EngineConfig
from slimlm.errors import SlimlmError
from slimlm.plan.devices import Device, describe_device
from slimlm.plan.inference import kv_block_bytes, kv_bytes_per_token, kv_staging_bytes, weight_bytes
from slimlm.plan.models import resolve_model
from slimlm.plan.serving import InferenceSettings, plan_inference, suggest
from slimlm.plan.units import GB
from tests.tiny_models import BASE, make_hf_model

LLAMA2_7B = resolve_model("llama-2-7b").config
# Llama-2-7B's published tensor sizes: 32 layers; per layer q, k, v, o 4096x4096, gate/up 11008x4096,
# down 4096x11008; embedding and lm_head 32000x4096; 65 norms of 4096.
EMBED = 32000 * 4096
NORMS = 65 * 4096
PROJ = 32 * (4 * 4096 * 4096 + 3 * 11008 * 4096)
ROWS = 32 * (4 * 4096 + 2 * 11008 + 4096)  # output channels of all projections


def test_float_weights_are_parameters_times_bytes():
    n = LLAMA2_7B.num_parameters()
    assert n == PROJ + 2 * EMBED + NORMS == 6_738_415_616
    assert weight_bytes(LLAMA2_7B, "fp32") == 4 * n
    assert weight_bytes(LLAMA2_7B, "fp16") == weight_bytes(LLAMA2_7B, "bf16") == 2 * n


def test_quantized_weights_count_scales_zeros_and_unquantized_tensors():
    norms = NORMS * 2  # norms stay bf16
    # w4 group 128: half a byte per weight + bf16 scale and zero per group of 128 per output channel
    groups = 32 * (4 * 4096 * (4096 // 128) + 2 * 11008 * (4096 // 128) + 4096 * (11008 // 128))
    # the embedding and the (untied) lm_head are quantized too: w4 at the same group size ...
    embed_w4 = 2 * (EMBED // 2 + 32000 * (4096 // 128) * 4)
    assert weight_bytes(LLAMA2_7B, "w4", 128) == PROJ // 2 + groups * 4 + embed_w4 + norms
    # ... w8 in groups of 32 whatever the decoder's group size (Q8_0's blocks): scale and zero per group,
    # and, as nibble pairs on PyTorch's int4 kernel (quant/int8pair.py), the exact fp16 scale per group
    # and the two bf16 input multipliers per table
    embed_w8 = 2 * (EMBED + 32000 * (4096 // 32) * 4) + 2 * (32000 * (4096 // 32) * 2 + 4)
    assert weight_bytes(LLAMA2_7B, "w8", -1, quantize_embeddings=True) == PROJ + ROWS * 2 + embed_w8 + norms
    # w8 group 64: scale and zero per group, nibble pairs: + the exact float32 scale per group, + 4 bytes
    # of input multipliers per linear (7 a layer)
    pairs = (PROJ // 64) * 4 + 32 * 7 * 4
    assert (
        weight_bytes(LLAMA2_7B, "w8", 64, quantize_embeddings=True)
        == PROJ + (PROJ // 64) * 4 + pairs + embed_w8 + norms
    )
    # asymmetric (quantize --sym false): + a uint8 zero point per group
    assert (
        weight_bytes(LLAMA2_7B, "w8", 64, quantize_embeddings=True, sym=False)
        == PROJ + (PROJ // 64) * 4 + pairs + PROJ // 64 + embed_w8 + norms
    )
    # a per-channel 8-bit table (--embedding-group-size -1): a byte per weight + one bf16 scale per row
    channel = 2 * (EMBED + 32000 * 2)
    assert (
        weight_bytes(LLAMA2_7B, "w8", 64, quantize_embeddings=True, embedding_group_size=-1)
        == PROJ + (PROJ // 64) * 4 + pairs + channel + norms
    )
    # beside 4-bit weights an 8-bit table stays per channel (the measured w4 recipes)
    assert weight_bytes(LLAMA2_7B, "w4", 128, embedding_bits=8) == PROJ // 2 + groups * 4 + channel + norms
    assert weight_bytes(LLAMA2_7B, "w4", 128, dtype="fp32") == PROJ // 2 + groups * 4 + embed_w4 + norms * 2
    # --keep-embeddings-float (and checkpoints from before): embeddings, lm_head and norms stay bf16
    rest = (2 * EMBED + NORMS) * 2
    assert weight_bytes(LLAMA2_7B, "w4", 128, quantize_embeddings=False) == PROJ // 2 + groups * 4 + rest
    assert weight_bytes(LLAMA2_7B, "w8", -1, quantize_embeddings=False) == PROJ + ROWS * 2 + rest


def test_tied_lm_head_is_counted_once():
    tied = resolve_model("qwen2.5-0.5b").config
    assert tied.tie_word_embeddings
    hf = make_hf_model("llama-tied")
    from slimlm.config import ModelConfig

    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    unique = {p.data_ptr(): p.numel() for p in hf.parameters()}
    assert weight_bytes(config, "fp32") == 4 * sum(unique.values())


def test_kv_bytes_per_token_is_gqa_aware():
    # Llama-2-7B (MHA, 32 kv heads of 128): the classic 0.5 MiB per token in fp16
    assert kv_bytes_per_token(LLAMA2_7B, "fp16") == 2 * 32 * 32 * 128 * 2 == 524_288
    llama3 = resolve_model("llama-3-8b").config  # 8 kv heads: 4x less
    assert kv_bytes_per_token(llama3, "bf16") == 131_072
    # int8: codes + fp16 scale + uint8 zero per token per head, for K and V; int4: a scale and zero
    # per 16 channels; k8v4: int8 keys, int4 values
    assert kv_bytes_per_token(llama3, "int8") == 2 * 32 * 8 * (128 + 3)
    # int4 at block 16: codes, a scale + zero per token for V, per channel per block for K, and a
    # 4-byte staging index per block
    assert kv_block_bytes(llama3, "int4", 16) == 32 * 8 * (16 * (64 + 64 + 3) + 3 * 128) + 4
    assert kv_bytes_per_token(llama3, "k8v4") == 32 * 8 * (128 + 3 + 64 + 3)
    assert kv_block_bytes(llama3, "fp32", 16) == 16 * 2 * 32 * 8 * 128 * 4
    with pytest.raises(SlimlmError, match="unknown KV dtype"):
        kv_bytes_per_token(llama3, "int3")


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "fp16", "int8", "int4", "k8v4"])
def test_kv_block_bytes_equal_what_the_engine_allocates(kv_dtype):
    from slimlm.config import ModelConfig
    from slimlm.kv import kv_cache_class, make_kv_cache

    if kv_dtype in ("int8", "int4", "k8v4"):
        pytest.importorskip("slimlm.kv.quantized")
    config = ModelConfig.from_hf_dict({**BASE, "architectures": ["LlamaForCausalLM"]})
    cache = make_kv_cache(config, 3, 16, kv_dtype, torch.float32, "cpu", max_seqs=2)
    planned = kv_block_bytes(config, kv_dtype, 16)
    assert cache.nbytes == 3 * planned + kv_staging_bytes(config, kv_dtype, 16, 2)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        kv_dtype, torch.float32
    )
    assert kv_cache_class(kv_dtype).bytes_per_block(config, 16, dtype) == planned


def test_classic_7b_fp16_on_24gb_with_cache_fraction_0_8():
    """The classic arithmetic: 7B fp16 = 14 GB of weights, 0.8 x the remaining 10 GB for KV -> ~22 GB.
    It simplifies by ignoring the CUDA context and workspaces and by rounding 6.74 B parameters to 7 B."""
    device = describe_device(None, "24GB", cuda_context_bytes=0)
    plan = plan_inference(LLAMA2_7B, device, InferenceSettings(weight_format="fp16", runtime_overheads=False))
    weights = 2 * 6_738_415_616
    block = kv_block_bytes(LLAMA2_7B, "fp16", 16)
    assert plan.components[0].bytes == weights
    assert plan.kv_blocks == int((24 * GB - weights) * 0.8) // block
    assert abs(plan.total_bytes - 22 * GB) < 0.2 * GB  # 21.89 GB
    # with the CUDA context and runtime overheads counted it still fits under 24 GB
    full = plan_inference(LLAMA2_7B, describe_device(None, "24GB"), InferenceSettings(weight_format="fp16"))
    assert full.fits and full.total_bytes <= 24 * GB
    assert full.kv_blocks < plan.kv_blocks  # the context comes out of the free memory first


def test_capacity_max_batch_and_max_context():
    device = Device("test", 40 * GB, 40 * GB, "gpu", 0)
    engine = EngineConfig(kv_cache_tokens=16 * 1000, max_num_seqs=256)
    plan = plan_inference(
        LLAMA2_7B, device, InferenceSettings(weight_format="fp16", context=2000, batch=5, engine=engine)
    )
    assert plan.kv_tokens == 16000  # 1000 blocks of 16
    assert plan.max_concurrent_sequences == 1000 // 125  # 2000 tokens = 125 blocks
    assert plan.max_context == (1000 // 5) * 16
    assert plan.fits
    too_many = plan_inference(
        LLAMA2_7B, device, InferenceSettings(weight_format="fp16", context=2000, batch=9, engine=engine)
    )
    assert not too_many.fits and "needs" in too_many.problems[0]
    changes = [s["change"] for s in suggest(too_many)]
    assert changes[0] == "batch 8" and "context 1776" in changes
    assert "--kv-cache-tokens 18000" in changes  # an absolute budget is raised, not quantized


def test_engine_pool_cap_and_weights_that_do_not_fit():
    device = Device("big", 80 * GB, 80 * GB, "gpu", 0)
    small = resolve_model("qwen2.5-0.5b").config
    engine = EngineConfig(max_num_seqs=4, max_model_len=1024)
    plan = plan_inference(small, device, InferenceSettings(engine=engine))
    assert plan.kv_tokens == 4 * 1024  # capped like the engine: max_num_seqs full-length sequences
    assert "capped" in plan.kv_budget_source

    tiny = Device("tiny", 10 * GB, 10 * GB, "gpu", 0)
    big = plan_inference(LLAMA2_7B, tiny, InferenceSettings(weight_format="fp16"))
    assert not big.fits and big.kv_blocks == 0 and "weights alone" in big.problems[0]
    fixes = suggest(big)
    assert fixes and fixes[0]["change"].startswith("--weights w8")


def test_overheads_that_do_not_fit_suggest_a_smaller_fraction():
    device = Device("24", 24 * GB, 24 * GB, "gpu", 512 * 2**20)
    engine = EngineConfig(cache_max_entry_count=1.0)
    plan = plan_inference(
        LLAMA2_7B, device, InferenceSettings(weight_format="fp16", engine=engine, context=512)
    )
    assert not plan.fits and "lower --cache-max-entry-count" in plan.problems[0]
    assert suggest(plan)[0]["change"] == "--cache-max-entry-count 0.7"


def test_bad_inference_settings():
    with pytest.raises(SlimlmError, match="batch must be a positive"):
        InferenceSettings(batch=-1)
    with pytest.raises(SlimlmError, match="context must be"):
        InferenceSettings(context=0)
    with pytest.raises(SlimlmError, match="unknown weight format"):
        InferenceSettings(weight_format="w3")
    for fraction in (0.0, 1.5, -0.2):
        with pytest.raises(SlimlmError, match=r"in \(0, 1\]"):
            EngineConfig(cache_max_entry_count=fraction)


def test_embeddings_default_follows_slimlm_quantize_auto_rule():
    from slimlm.commands.plan import _weight_format

    # auto: quantized for w4 and (as an int8 g32 table) for w8 (`slimlm quantize --embeddings auto`)
    assert weight_bytes(LLAMA2_7B, "w4", 128) == weight_bytes(LLAMA2_7B, "w4", 128, quantize_embeddings=True)
    assert weight_bytes(LLAMA2_7B, "w8", -1) == weight_bytes(LLAMA2_7B, "w8", -1, quantize_embeddings=True)
    assert _weight_format("w4", "bf16", LLAMA2_7B, "auto")[2] is True
    assert _weight_format("w8", "bf16", LLAMA2_7B, "auto")[2] is True
    assert _weight_format("w8", "bf16", LLAMA2_7B, "float")[2] is False
    assert _weight_format("w8", "bf16", LLAMA2_7B, "quantize")[2] is True
    assert _weight_format("w4", "bf16", LLAMA2_7B, "float")[2] is False
    assert _weight_format("w4", "bf16", LLAMA2_7B, True)[2] is False  # the old keep-float flag
