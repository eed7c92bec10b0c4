"""The planner's weight and KV figures equal the bytes the engine actually allocates (issue 4, 6)."""

from __future__ import annotations

import pytest

from slimlm.engine.llm import LLM
from slimlm.plan.inference import kv_block_bytes, kv_staging_bytes, weight_bytes


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "fp16", "int8", "int4", "k8v4"])
def test_planner_kv_bytes_equal_the_engine_pool(smollm, kv_dtype):
    if kv_dtype in ("int8", "int4", "k8v4"):
        pytest.importorskip("slimlm.kv.quantized")
    llm = LLM.from_loaded(smollm, kv_cache_tokens=4096, block_size=16, kv_dtype=kv_dtype, max_num_seqs=8)
    report = llm.memory_report()
    staging = kv_staging_bytes(smollm.config, kv_dtype, 16, 8)  # int4's bf16 slots for unfinished blocks
    assert (kv_dtype == "int4") == (staging > 0)
    assert (
        report["kv_pool_bytes"] == report["kv_blocks"] * kv_block_bytes(smollm.config, kv_dtype, 16) + staging
    )


def test_planner_weight_bytes_equal_the_loaded_model(smollm):
    llm = LLM.from_loaded(smollm, kv_cache_tokens=64)
    params = {id(p): p for p in smollm.model.parameters()}.values()
    allocated = sum(p.numel() * p.element_size() for p in params)
    assert weight_bytes(smollm.config, "fp32") == allocated
    assert llm.memory_report()["weights_bytes"] >= allocated


def test_int4_kv_holds_more_tokens_at_the_same_budget(smollm):
    pytest.importorskip("slimlm.kv.quantized")
    budget = 64 * 2**20
    tokens = {
        d: LLM.from_loaded(smollm, kv_cache_bytes=budget, kv_dtype=d, max_num_seqs=8).memory_report()[
            "kv_tokens"
        ]
        for d in ("bf16", "int8", "int4")
    }
    assert tokens["int8"] >= 1.9 * tokens["bf16"]
    # int4 (KIVI) blocks hold 3.24x bf16's tokens; its bf16 staging for 8 sequences (33 slots: 2 sink
    # blocks, 2 unfinished blocks each, + 1; 11.9 MiB) comes out of the budget
    assert tokens["int4"] >= 2.6 * tokens["bf16"]  # 2.65x here


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, -1)])
@pytest.mark.parametrize("embeddings", [True, False])
def test_planner_quantized_weight_bytes_equal_the_quantized_model(bits, group_size, embeddings):
    """w4/w8 as `slimlm quantize` makes them (embedding and tied lm_head quantized by default)."""
    from slimlm.commands.plan import _weight_format
    from slimlm.loading import load
    from slimlm.quant.quantize import quantize_model, quantized_weight_bytes

    loaded = load(None, dtype="bfloat16", progress=False)
    # the 8-bit table per channel: its PyTorch module holds what the planner counts (the default int8
    # g32 table holds a fp16 scale and a uint8 zero per group, the kernel two fp16: planned as 4 bytes)
    table = -1 if bits == 8 else None
    qconfig = quantize_model(
        loaded.model, "rtn", bits, group_size, progress=False, quantize_embeddings=embeddings,
        embedding_group_size=table,
    )  # fmt: skip
    allocated = quantized_weight_bytes(loaded.model)  # every persistent tensor, the shared table once
    planned = weight_bytes(
        loaded.config, f"w{bits}", group_size, dtype="bf16", quantize_embeddings=embeddings,
        embedding_group_size=table,
    )  # fmt: skip
    assert planned == allocated
    llm = LLM.from_loaded(loaded, kv_cache_tokens=64)
    assert llm.memory_report()["weights_bytes"] >= allocated
    # `slimlm plan -m <checkpoint>` reads the format from the checkpoint's quantization config
    loaded.config.quantization = qconfig
    assert _weight_format("auto", "bf16", loaded.config, False) == (f"w{bits}", group_size, embeddings)
    old = {k: v for k, v in qconfig.items() if k != "quantize_embeddings"}  # made before embeddings were
    loaded.config.quantization = old
    assert _weight_format("auto", "bf16", loaded.config, False)[2] is False


@pytest.mark.parametrize("group_size,sym", [(64, None), (64, False), (32, None)])
def test_planner_grouped_8bit_on_the_pytorch_path_counts_the_pair_layout(group_size, sym):
    """Grouped 8-bit weights on the PyTorch path (`--decode-kernel torch`, CUDA, a CPU without VNNI) run as
    nibble pairs (quant/int8pair.py), which also keep the exact scales (float32 per linear group, fp16
    for rtn's Q8_0-grid table) and, when asymmetric, uint8 zeros: `slimlm plan -m CKPT` counts them. It
    planned 144.7 MB for the 153.1 MB SmolLM2's `quantize --bits 8` holds there."""
    from slimlm.commands.plan import _checkpoint_choices, _checkpoint_zeros, _weight_format
    from slimlm.loading import load
    from slimlm.plan.serving import InferenceSettings, _weights_bytes
    from slimlm.quant.quantize import quantize_model, quantized_weight_bytes

    loaded = load(None, dtype="bfloat16", progress=False)
    qconfig = quantize_model(loaded.model, "rtn", 8, group_size, progress=False, sym=sym)
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert "Int8PairLinear" in kinds  # the layout this test is about
    allocated = quantized_weight_bytes(loaded.model)
    loaded.config.quantization = qconfig
    fmt, group, embeddings = _weight_format("auto", "bf16", loaded.config, False)
    settings = InferenceSettings(
        weight_format=fmt, group_size=group, dtype="bf16", quantize_embeddings=embeddings,
        **_checkpoint_choices("auto", loaded.config), **_checkpoint_zeros("auto", loaded.config),
    )  # fmt: skip
    settings.layout = "torch"
    assert _weights_bytes(loaded.config, settings) == allocated


def test_planner_counts_an_8bit_table_and_per_linear_group_sizes():
    """The recommended w4 recipe (8-bit embedding table) and mixed group sizes: `slimlm plan -m CKPT`
    reads them from the checkpoint's config and plans the bytes the quantized model holds."""
    from slimlm.commands.plan import _checkpoint_choices, _weight_format
    from slimlm.loading import load
    from slimlm.quant.quantize import quantize_model, quantized_weight_bytes

    loaded = load(None, dtype="bfloat16", progress=False)
    sizes = {"mlp.down_proj": 32, "0.self_attn.v_proj": 32}
    qconfig = quantize_model(
        loaded.model, "rtn", 4, 64, progress=False, quantize_embeddings=True, float_zero=True,
        embedding_bits=8, group_sizes=sizes,
    )  # fmt: skip
    allocated = quantized_weight_bytes(loaded.model)
    loaded.config.quantization = qconfig
    fmt, group, embeddings = _weight_format("auto", "bf16", loaded.config, False)
    choices = _checkpoint_choices("auto", loaded.config)
    assert choices == {"embedding_bits": 8, "group_sizes": sizes, "embedding_group_size": -1}
    planned = weight_bytes(loaded.config, fmt, group, dtype="bf16", quantize_embeddings=embeddings, **choices)
    assert planned == allocated
    # without the checkpoint's choices the plan is the uniform w4 g64 one, which is smaller
    assert weight_bytes(loaded.config, fmt, group, dtype="bf16", quantize_embeddings=embeddings) < allocated


@pytest.mark.parametrize(
    "bits,group_size,embeddings,float_zero,embedding_bits",
    [
        (4, 64, True, False, None),
        (4, 32, True, True, 8),
        (8, 64, False, False, None),
        (8, 64, None, False, None),  # `quantize --bits 8`: the int8 g32 table on Q8_0's grid, fp16 scales
        (8, -1, True, False, None),
    ],
)
def test_planner_kernel_layout_bytes_equal_what_the_engine_holds(
    bits, group_size, embeddings, float_zero, embedding_bits
):
    """On a bf16 CPU engine the C kernel holds quantized weights in its own layout (rows padded to 16, (d, m)
    per group in fp16 or float32, q/k/v and gate/up fused): `slimlm plan` on the checkpoint plans those
    bytes (issue 15), not PyTorch's QuantLinear layout."""
    from slimlm.commands.plan import (
        _checkpoint_choices,
        _checkpoint_zeros,
        _weight_format,
        quantized_runtime_layout,
    )
    from slimlm.loading import load
    from slimlm.plan.serving import InferenceSettings, _weights_bytes
    from slimlm.quant.quantize import quantize_model

    loaded = load(None, dtype="bfloat16", progress=False)
    qconfig = quantize_model(
        loaded.model, "rtn", bits, group_size, progress=False, quantize_embeddings=embeddings,
        float_zero=float_zero, embedding_bits=embedding_bits,
    )  # fmt: skip
    loaded.config.quantization = qconfig
    fmt, group, quantize_embeddings = _weight_format("auto", "bf16", loaded.config, False)
    settings = InferenceSettings(
        weight_format=fmt, group_size=group, dtype="bf16", quantize_embeddings=quantize_embeddings,
        **_checkpoint_choices("auto", loaded.config), **_checkpoint_zeros("auto", loaded.config),
    )  # fmt: skip
    settings.layout = quantized_runtime_layout(loaded.config, settings, "cpu")
    llm = LLM.from_loaded(loaded, kv_cache_tokens=64, weights_layout="auto")  # as `LLM(path)` and serve do
    report = llm.memory_report()
    assert ("C kernel layout" in report["weights_format"]) == (settings.layout == "kernel")
    if settings.layout != "kernel":
        pytest.skip(f"the C kernel does not run here ({report['decode_kernel']})")
    # the report counts buffers too: the rotary table is not a weight
    rotary = sum(b.numel() * b.element_size() for n, b in loaded.model.named_buffers() if "rotary" in n)
    assert _weights_bytes(loaded.config, settings) == report["weights_bytes"] - rotary
    # against the QuantLinear layout's figure: fp16-exact grouped (d, m) (every grid `quantize` writes
    # but float zeros, quant/kernel_scales.py) take no more than its (scale, zero) pairs; older float32
    # ones, float zeros and per-channel m take more
    settings.layout = "torch"
    torch_layout = _weights_bytes(loaded.config, settings)
    if qconfig.get("fp16_scales") and group_size != -1:  # per channel, the kernel adds m = -128·d per row
        assert settings.fp16_scales and report["weights_bytes"] - rotary <= torch_layout
    else:
        assert torch_layout != report["weights_bytes"] - rotary
