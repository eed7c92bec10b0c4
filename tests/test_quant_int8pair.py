"""Group-wise int8 on PyTorch's int4 kernels (quant/int8pair.py): every path against a float32 matmul on
the dequantized weights, the exact round trip of codes and scales, the tied table's lookups and head."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slimlm.quant.int8pair as int8pair
from slimlm.quant.embedding import QuantEmbedding
from slimlm.quant.int8pair import Int8PairLinear, pair_codes, unpair_codes
from slimlm.quant.linear import DequantLinear, make_quant_linear
from slimlm.quant.quantize import quantize_model
from slimlm.quant.rtn import rtn_quantize
from slimlm.quant.scheme import QuantizedWeight
from tests.tiny_models import make_hf_model


def _weight(out, n_in, group_size, sym=True, narrow=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * torch.rand(out, 1, generator=g)  # rows of different ranges
    return rtn_quantize(w, 8, group_size, sym, narrow=narrow)


def _rel_err(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.float() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("sym,narrow", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_every_path_matches_a_float32_matmul_on_the_dequantized_weight(group_size, sym, narrow, rows):
    qweight = _weight(192, 384, group_size, sym, narrow)
    assert qweight.scales.dtype == (torch.float16 if narrow else torch.float32)
    bias = torch.randn(192)
    module = make_quant_linear(qweight, bias)
    assert type(module) is Int8PairLinear
    x = torch.randn(rows, 384)
    reference = F.linear(x, qweight.dequantize(), bias)
    many = rows > int8pair.DEQUANT_ROWS
    # the kernel takes bf16 inputs and bf16-rounded scales; the many-row path dequantizes exactly
    assert _rel_err(module(x), reference) < (1e-5 if many else 1e-2)
    out = module(x.to(torch.bfloat16).view(1, rows, 384))
    assert out.dtype == torch.bfloat16 and out.shape == (1, rows, 192)
    assert _rel_err(out[0], reference) < 1e-2


def test_chunked_and_gathered_dequantization_are_exact(monkeypatch):
    qweight = _weight(320, 192, 64, sym=False)
    x = torch.randn(40, 192)
    reference = F.linear(x, qweight.dequantize())
    monkeypatch.setattr(int8pair, "CHUNK_ROWS", 128)  # 128 + 128 + 64 rows
    module = Int8PairLinear(qweight, None)
    assert module._cpu_blocks()
    assert _rel_err(module(x), reference) < 1e-6
    module._blocks = False  # the generic path (CUDA's layout): rows gathered by the row plan
    assert _rel_err(module._dequantized_mm(x), reference) < 1e-6


def test_odd_shapes_fall_back_correctly():
    # 48 rows: no whole 64-row block, so no row plan; every call runs the kernel, lookups unpack all
    small = _weight(48, 96, 32)
    module = make_quant_linear(small)
    assert type(module) is Int8PairLinear and module.row_plan() is None
    x = torch.randn(40, 96)
    assert _rel_err(module(x), F.linear(x, small.dequantize())) < 1e-2
    assert torch.equal(module.quantized_weight().codes, small.codes)
    # 40 rows: the CPU int4 kernel needs a multiple of 16 -> the dequantizing fallback
    odd = _weight(40, 96, 32)
    fallback = make_quant_linear(odd)
    assert type(fallback) is DequantLinear
    assert _rel_err(fallback(x), F.linear(x, odd.dequantize())) < 1e-5
    # per-channel int8 keeps torch's int8 kernel; groups the int4 kernel lacks keep the fallback
    assert type(make_quant_linear(_weight(48, 96, -1))) is not Int8PairLinear


@pytest.mark.parametrize("narrow", [False, True])
def test_codes_scales_and_zeros_round_trip_exactly_through_dtype_casts(narrow):
    qweight = _weight(64, 256, 32, sym=narrow, narrow=narrow)
    module = Int8PairLinear(qweight, torch.randn(64)).to(torch.bfloat16)  # model.to(dtype) must not round
    back = module.quantized_weight()
    assert torch.equal(back.codes, qweight.codes)
    assert back.scales.dtype == qweight.scales.dtype and torch.equal(back.scales, qweight.scales)
    assert torch.equal(back.zeros.to(torch.int32), qweight.zeros.to(torch.int32))
    assert torch.equal(unpair_codes(pair_codes(qweight.codes, 32), 32), qweight.codes)


@pytest.mark.parametrize("perm", [False, True])
def test_dequantized_weight_is_exact(monkeypatch, perm):
    monkeypatch.setattr(int8pair, "CHUNK_ROWS", 128)
    qweight = _weight(320, 128, 32, sym=False)
    if perm:
        qweight.perm = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    module = make_quant_linear(qweight)
    assert module._cpu_blocks()
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(module.dequantized_weight(dtype), qweight.dequantize(dtype))


def test_act_order_permutation_is_applied():
    qweight = _weight(64, 128, 32)
    qweight.perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    module = make_quant_linear(qweight)
    assert type(module) is Int8PairLinear
    for rows in (2, 40):
        x = torch.randn(rows, 128)
        assert _rel_err(module(x), F.linear(x, qweight.dequantize())) < 1e-2
    assert torch.equal(module.quantized_weight().perm, qweight.perm)


def test_tied_int8_table_lookups_and_head_match_the_dequantized_table():
    model = make_hf_model("llama-tied")
    quantize_model(model, "rtn", 8, 32, progress=False)  # the 8-bit default: int8 g32 table, Q8_0 grid
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantEmbedding) and isinstance(embed.table, Int8PairLinear)
    assert model.lm_head is embed.table  # one table for lookups and the head
    table = embed.table.quantized_weight().dequantize()
    ids = torch.tensor([[0, 5, 5, model.config.vocab_size - 1]])
    assert torch.equal(embed(ids).float(), table[ids])  # only the looked-up rows, exactly
    hidden = torch.randn(3, table.shape[1])
    assert _rel_err(model.lm_head(hidden), hidden @ table.T) < 1e-2
    # the whole model against float32 matmuls on its own dequantized weights
    from slimlm.train.merge import dequantize_model

    dequantized = copy.deepcopy(model)
    dequantize_model(dequantized, torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # 40 rows (the head dequantizes exactly; narrow k/v projections, no 64-row block, run the
        # kernel with bf16 inputs) and one row (every linear on the kernel)
        for n in (40, 1):
            got, want = model(tokens[:, :n]).logits, dequantized(tokens[:, :n]).logits
            assert _rel_err(got, want) < 1e-2
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_bad_scheme_inputs_are_not_taken_by_the_pair_kernel():
    codes = torch.randint(0, 256, (64, 128), dtype=torch.uint8)
    float_zero = QuantizedWeight(codes, torch.rand(64, 4) + 0.1, torch.rand(64, 4) * 200, 8, 32)
    assert not int8pair.pair_fits(float_zero, "cpu")  # float zero points: w = s·q + m has no nibble form
    assert not int8pair.pair_fits(_weight(64, 128, 32), "mps")  # no int4 kernel there


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 40])
def test_cuda_pair_kernel_and_device_moves(rows):
    qweight = _weight(128, 256, 64)
    module = make_quant_linear(qweight.map_tensors(lambda t: t.cuda()), torch.randn(128, device="cuda"))
    assert type(module) is Int8PairLinear
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(x.float(), qweight.dequantize().cuda(), module.bias.float())
    assert _rel_err(module(x), reference) < 2e-2
    moved = module.cpu()
    assert torch.equal(moved.quantized_weight().codes, qweight.codes)
    assert torch.equal(moved.cuda().quantized_weight().scales.cpu(), qweight.scales)


@pytest.mark.slow
def test_smollm_w8_default_on_the_torch_path(smollm):
    """The 8-bit default (int8 g64 linears, int8 g32 tied table) of the real SmolLM2: every linear and
    the table on the pair kernel; logits against float32 matmuls on the dequantized weights; the
    engine's PyTorch path generates what the model's own forward does."""
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams
    from slimlm.generation import generate_tokens
    from slimlm.loading import load
    from slimlm.train.merge import dequantize_model

    loaded = load(None, dtype="bfloat16", progress=False)
    model = loaded.model
    quantize_model(model, "rtn", 8, 64, progress=False)
    quant = [m for m in model.modules() if isinstance(m, Int8PairLinear)]
    assert len(quant) == 30 * 7 + 1 and model.lm_head is model.model.embed_tokens.table
    dequantized = copy.deepcopy(model)
    dequantize_model(dequantized, torch.float32)
    dequantized.float()
    ids = smollm.tokenizer.encode("The capital of France is", add_special_tokens=False)
    llm = LLM.from_loaded(loaded, kv_cache_tokens=256, decode_kernel="torch")
    [result] = llm.generate(ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert result.token_ids == list(generate_tokens(model, ids, 12))
    # teacher-forced over the prompt and the generated text: top-1 and logits against float32
    tokens = torch.tensor([ids + result.token_ids])
    with torch.no_grad():
        got = _model_logits(model, tokens)
        want = _model_logits(dequantized, tokens)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert _rel_err(got, want) < 5e-2


def _model_logits(model, tokens):
    return model.forward_dense(tokens).float()  # [1, S, vocab]: the many-row path up to 32 rows
