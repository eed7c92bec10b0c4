"""The 8-bit default's embedding/lm_head table: int8 in groups of 32 on llama.cpp's Q8_0 grid (issue 15/19).

Reference: gguf-py's Q8_0 quantizer (bit-exact with ggml-quants.c): a table whose values lie on a Q8_0
grid, as a GGUF ships it (the embedded SmolLM2's token_embd is Q8_0), is reproduced exactly, codes and
fp16 scales; the C kernel keeps those scales at 2 bytes. Also: the rule for the table's group size, the
planner's bytes, and the bad values.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.quant.embedding import QuantEmbedding
from slimlm.quant.quantize import quantize_model
from slimlm.quant.rtn import rtn_quantize
from tests.tiny_models import make_hf_model

gguf = pytest.importorskip("gguf", reason="gguf-py ships with llama-cpp-python / transformers' GGUF support")


def _q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gguf-py's Q8_0 of `w` [rows, k]: (dequantized float32, d fp16 [rows, k/32], signed codes)."""
    t = gguf.GGMLQuantizationType.Q8_0
    raw = gguf.quants.quantize(w.numpy(), t)
    blocks = raw.reshape(-1, 34)
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).reshape(w.shape[0], -1))
    q = torch.from_numpy(blocks[:, 2:].copy().view(np.int8).reshape(w.shape))
    return torch.from_numpy(gguf.quants.dequantize(raw, t).reshape(w.shape)), d, q


def test_an_int8_g32_table_reproduces_a_q8_0_table_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * torch.rand(96, 1, generator=g)  # rows of different ranges
    table, d, q = _q8_0(w)
    ours = rtn_quantize(table, 8, 32, sym=True, narrow=True)
    assert ours.scales.dtype == torch.float16 and torch.equal(ours.scales, d)
    assert torch.equal(ours.codes.to(torch.int16) - 128, q.to(torch.int16))
    assert torch.equal(ours.dequantize(), table)
    # the wide symmetric grid (s = 2·absmax / 255, what the per-channel table uses) moves values off it
    wide = rtn_quantize(table, 8, 32, sym=True)
    assert (wide.dequantize() - table).abs().max() > 0
    # on float weights the narrow grid is Q8_0 rounded against the stored scale: no worse than gguf-py's
    err_ours = (rtn_quantize(w, 8, 32, sym=True, narrow=True).dequantize() - w).pow(2).mean()
    assert err_ours <= (table - w).pow(2).mean()


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_model("llama")  # hidden 64, 2 layers, tied embedding


def test_the_8bit_default_quantizes_the_table_in_q8_0_blocks(hf_llama):
    from slimlm.kernels.qlayout import to_kernel_layout

    model = copy.deepcopy(hf_llama)
    config = quantize_model(model, "rtn", 8, 32, progress=False)
    assert config["quantize_embeddings"] is True and config["embedding_group_size"] == 32
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantEmbedding) and embed.table.group_size == 32
    qw = embed.table.quantized_weight()
    assert qw.scales.dtype == torch.float16 and qw.is_symmetric
    # the table is RTN on the narrow (Q8_0) grid of the float table
    source = hf_llama.model.embed_tokens.weight.detach().float()
    assert torch.equal(
        embed.dequantized_table(), rtn_quantize(source, 8, 32, sym=True, narrow=True).dequantize()
    )
    to_kernel_layout(model)
    kw = model.lm_head.kernel_weight()
    assert kw.describe() == "int8 g32" and kw.scale_bits == 16  # fp16 d and m, as Q8_0's d


def test_the_table_group_rule_and_its_overrides(hf_llama):
    # beside 4-bit decoder weights the 8-bit table stays per channel (the measured w4 recipes)
    four = copy.deepcopy(hf_llama)
    config = quantize_model(four, "rtn", 4, 32, progress=False, embedding_bits=8)
    assert "embedding_group_size" not in config
    assert four.model.embed_tokens.table.group_size == four.model.embed_tokens.embedding_dim
    # explicit: a per-channel table at 8 bits, or float embeddings
    channel = copy.deepcopy(hf_llama)
    config = quantize_model(channel, "rtn", 8, 32, progress=False, embedding_group_size=-1)
    assert "embedding_group_size" not in config  # no key: per channel, as every checkpoint before
    assert channel.model.embed_tokens.table.group_size == channel.model.embed_tokens.embedding_dim
    float_table = copy.deepcopy(hf_llama)
    config = quantize_model(float_table, "rtn", 8, 32, progress=False, quantize_embeddings=False)
    assert not isinstance(float_table.model.embed_tokens, QuantEmbedding)
    with pytest.raises(SlimlmError, match="unsupported group size 48"):
        quantize_model(copy.deepcopy(hf_llama), "rtn", 8, 32, progress=False, embedding_group_size=48)
