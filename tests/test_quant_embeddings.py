"""Quantized token embeddings and lm_head: one shared table, exact lookups, save/load, the real SmolLM2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quant.embedding import QuantEmbedding, int4_row_plan
from slimlm.quant.format import load_quantized_state, save_quantized
from slimlm.quant.linear import DequantLinear, Int4TinyGemmLinear, Int8Linear, QuantLinear
from slimlm.quant.quantize import quantize_model, quantized_weight_bytes
from slimlm.quant.rtn import rtn_quantize
from slimlm.quant.scheme import QuantizedWeight
from tests.tiny_models import make_hf_model, slimlm_from_hf

SCHEMES = [(4, 32), (8, -1)]


def _reference_rows(weight: torch.Tensor, bits: int, group_size: int, ids: torch.Tensor, dtype=torch.float32):
    """Independent of every packed layout: RTN codes straight from the float weight, bf16 scales (what
    both kernels store), dequantized."""
    q = rtn_quantize(weight, bits, group_size if bits == 4 else -1, sym=bits == 8)
    q.scales = q.scales.to(torch.bfloat16)
    return q.dequantize(dtype)[ids]


def _logits(model, ids):
    with torch.no_grad():
        return model.forward_dense(ids) if hasattr(model, "forward_dense") else model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
@pytest.mark.parametrize("bits,group_size", SCHEMES)
def test_lookup_rows_are_the_dequantized_rows(arch, bits, group_size):
    model = slimlm_from_hf(make_hf_model(arch))
    weight = model.model.embed_tokens.weight.detach().clone()
    # the per-channel int8 table (the 8-bit default's g32 table: tests/test_quant_w8_table.py)
    table = -1 if bits == 8 else None
    quantize_model(model, "rtn", bits, group_size, progress=False, quantize_embeddings=True,
                   embedding_group_size=table)  # fmt: skip
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantEmbedding)
    assert type(embed.table) is (Int4TinyGemmLinear if bits == 4 else Int8Linear)
    ids = torch.tensor([[0, 1, 15, 16, 63], [64, 65, 100, 126, 127]])
    rows = embed(ids)
    assert rows.shape == (2, 5, 64) and rows.dtype == torch.float32
    assert torch.equal(rows, embed.table.dequantized_weight(torch.float32)[ids])
    assert torch.equal(rows, _reference_rows(weight, bits, group_size, ids))
    assert torch.equal(embed.dequantized_table(), embed.table.dequantized_weight())


@pytest.mark.parametrize("bits,group_size", SCHEMES)
def test_tied_model_keeps_one_table_for_lookup_and_lm_head(bits, group_size):
    model = slimlm_from_hf(make_hf_model("llama-tied"))
    quantize_model(model, "rtn", bits, group_size, progress=False, quantize_embeddings=True)
    embed, head = model.model.embed_tokens, model.lm_head
    assert embed.tied and head is embed.table and isinstance(head, QuantLinear)
    state = model.state_dict()
    assert not any(k.startswith("model.embed_tokens.") for k in state)  # stored once, under lm_head
    assert quantized_weight_bytes(model) == sum(t.numel() * t.element_size() for t in state.values())
    hidden = torch.randn(5, 64)
    expected = F.linear(hidden, head.dequantized_weight(torch.float32))
    torch.testing.assert_close(
        model.compute_logits(hidden), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())
    )


def test_untied_model_quantizes_embedding_and_lm_head_apart():
    hf = make_hf_model("llama")
    model = slimlm_from_hf(hf)
    quantize_model(model, "rtn", 4, 32, progress=False)
    embed = model.model.embed_tokens
    assert (
        not embed.tied and isinstance(model.lm_head, Int4TinyGemmLinear) and model.lm_head is not embed.table
    )
    hidden = torch.randn(3, 64)
    expected = F.linear(hidden, model.lm_head.dequantized_weight())
    torch.testing.assert_close(
        model.compute_logits(hidden), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())
    )
    assert torch.equal(
        embed(torch.tensor([5])), _reference_rows(hf.model.embed_tokens.weight.detach(), 4, 32, [5])
    )


def test_bf16_model_looks_up_bf16_rows_and_follows_dtype_casts():
    model = slimlm_from_hf(make_hf_model("llama-tied")).to(torch.bfloat16)
    quantize_model(model, "rtn", 4, 32, progress=False)
    ids = torch.arange(10)
    assert model.model.embed_tokens(ids).dtype == torch.bfloat16
    model.float()
    assert model.model.embed_tokens(ids).dtype == torch.float32


def test_hf_transformers_model_runs_with_quantized_embeddings():
    hf = make_hf_model("qwen2")  # tied
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = _logits(hf, ids)
    model = copy.deepcopy(hf)
    quantize_model(model, "rtn", 8, -1, progress=False, quantize_embeddings="quantize")
    assert model.lm_head is model.model.embed_tokens.table
    err = float((_logits(model, ids) - reference).norm() / reference.norm())
    assert err < 0.02, err


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
@pytest.mark.parametrize("method", ["rtn", "awq", "gptq"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, arch, method):
    hf = make_hf_model(arch)
    model = copy.deepcopy(hf)
    calib = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))]
    config = quantize_model(model, method, 4, 32, calib, progress=False)
    assert config["quantize_embeddings"] is True
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    expected = _logits(model, ids)
    save_quantized(model, config, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert "model.embed_tokens.qweight" in state and "model.embed_tokens.weight" not in state
    assert ("lm_head.qweight" in state) == (arch == "llama") and "lm_head.weight" not in state
    assert "model.embed_tokens.lookup_scale" not in state  # a tied AWQ head is clipped, not scaled
    assert config["head_method"] == method

    skeleton = make_hf_model(arch, seed=7)  # different float weights: everything must come from disk
    rest = load_quantized_state(skeleton, state, config)
    assert not any(k.startswith(("model.embed_tokens.", "lm_head.")) for k in rest)
    skeleton.load_state_dict(rest, strict=False)
    assert isinstance(skeleton.model.embed_tokens, QuantEmbedding)
    assert (skeleton.lm_head is skeleton.model.embed_tokens.table) == (arch == "llama-tied")
    assert torch.equal(_logits(skeleton, ids), expected)


def test_opt_out_keeps_embeddings_float_and_old_checkpoints_still_load(tmp_path):
    from slimlm.loading import load
    from tests.test_loading import _write_tiny_tokenizer

    hf = make_hf_model("llama-tied")
    model = slimlm_from_hf(hf)
    config = quantize_model(model, "rtn", 4, 32, progress=False, quantize_embeddings=False)
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    # A checkpoint written before embeddings were quantized has no quantize_embeddings key at all.
    del config["quantize_embeddings"]
    save_quantized(model, config, tmp_path)
    _write_tiny_tokenizer(tmp_path)
    loaded = load(str(tmp_path), dtype="float32", progress=False)
    assert type(loaded.model.model.embed_tokens) is nn.Embedding
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_logits(loaded.model, ids), _logits(model, ids))


def test_group_size_must_divide_the_hidden_size_of_the_embedding():
    model = slimlm_from_hf(make_hf_model("llama"))
    model.model.embed_tokens = nn.Embedding(128, 48)  # only the embedding has 48 columns
    with pytest.raises(SlimlmError, match=r"does not divide the 48 input features of model\.embed_tokens"):
        quantize_model(model, "rtn", 4, 32, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # checked before any change


def test_model_without_an_embedding_asks_for_the_opt_out():
    model = slimlm_from_hf(make_hf_model("llama"))
    model.model.embed_tokens = nn.Identity()
    with pytest.raises(SlimlmError, match="embeddings float"):
        quantize_model(model, "rtn", 4, 32, progress=False)
    quantize_model(model, "rtn", 4, 32, progress=False, quantize_embeddings=False)


def test_int4_row_plan_is_verified_against_the_kernel():
    table = Int4TinyGemmLinear(rtn_quantize(torch.randn(192, 64), 4, 32), None)
    period, offsets = int4_row_plan(table)
    assert 192 % period == 0 and offsets.shape == (period, 64)
    # A plan that is off by one row must fail the kernel check.
    from slimlm.quant.embedding import _kernel_agrees

    assert not _kernel_agrees(table, period, offsets.roll(1, dims=0))


def test_unpack_of_a_tall_int4_matrix_uses_the_row_period_and_is_exact():
    from slimlm.quant.linear import _unpack_plan

    codes = torch.randint(0, 16, (576, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    qweight = QuantizedWeight(codes, torch.rand(576, 3) + 0.1, torch.randint(0, 16, (576, 3)), 4, 32)
    assert torch.equal(Int4TinyGemmLinear(qweight, None).quantized_weight().codes, codes)
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":  # x86 AVX2/AVX512 builds tile rows by 64
        assert _unpack_plan(576, 96, torch.device("cpu")) is not None


def test_fallback_table_gives_the_same_rows():
    q = rtn_quantize(torch.randn(64, 64), 4, 32)
    # bf16 scales, what the int4 kernel stores, so both tables hold the same numbers
    q.scales = q.scales.to(torch.bfloat16)
    fast = QuantEmbedding(Int4TinyGemmLinear(q, None), torch.float32, tied=False)
    plain = QuantEmbedding(DequantLinear(q, None), torch.float32, tied=False)
    fast._plan_key, fast._plan = (fast.table.packed.device, fast.table.packed.data_ptr()), None  # no plan
    ids = torch.tensor([3, 0, 63, 17])
    assert torch.equal(fast(ids), plain(ids)) and torch.equal(plain(ids), q.dequantize()[ids])


# ---- the real SmolLM2-135M (tied, 49152 x 576 embedding) ----


@pytest.fixture(scope="module")
def smollm_w4(smollm, tmp_path_factory):
    """SmolLM2 loaded in bf16, quantized to w4 g64, saved with its tokenizer."""
    from slimlm.loading import load
    from slimlm.tokenizer.save import save_tokenizer

    model = load(None, dtype="bfloat16", progress=False).model  # as loading builds it (fp32 RoPE tables)
    config = quantize_model(model, "rtn", 4, 64, progress=False)
    out = tmp_path_factory.mktemp("smollm_w4")
    save_quantized(model, config, out, smollm.config.to_hf_dict())
    save_tokenizer(smollm.tokenizer, out)
    return model, out


def test_smollm_w4_is_under_a_third_of_bf16_and_lookups_are_exact(smollm, smollm_w4):
    model, _ = smollm_w4
    params = {id(p): p for p in smollm.model.parameters()}.values()
    bf16_bytes = 2 * sum(p.numel() for p in params)
    assert quantized_weight_bytes(model) <= 0.32 * bf16_bytes
    embed = model.model.embed_tokens
    assert embed.tied and model.lm_head is embed.table and isinstance(embed.table, Int4TinyGemmLinear)
    ids = torch.tensor([0, 1, 31, 32, 63, 64, 127, 128, 4242, 49087, 49151])
    weight = smollm.model.model.embed_tokens.weight.detach().to(torch.bfloat16)
    assert torch.equal(embed(ids), _reference_rows(weight, 4, 64, ids, torch.bfloat16))


def test_smollm_w4_checkpoint_loads_and_the_engine_generates(smollm, smollm_w4):
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams
    from slimlm.generation import generate_tokens
    from slimlm.loading import load

    model, out = smollm_w4
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quantize_embeddings"] is True
    loaded = load(str(out), dtype="bfloat16", progress=False)
    assert isinstance(loaded.model.model.embed_tokens, QuantEmbedding)
    assert quantized_weight_bytes(loaded.model) == quantized_weight_bytes(model)
    ids = torch.tensor([smollm.tokenizer.encode("The capital of France is", add_special_tokens=False)])
    assert torch.equal(_logits(loaded.model, ids), _logits(model, ids))
    prompt = ids[0].tolist()
    reference = list(generate_tokens(model, prompt, 8))
    llm = LLM.from_loaded(loaded, kv_cache_tokens=256)
    [result] = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert result.token_ids == reference


@pytest.mark.parametrize(
    "flags,bits,quantized",
    [([], 4, True), ([], 8, True), (["--keep-embeddings-float"], 4, False),
     (["--embeddings", "float"], 4, False), (["--embeddings", "quantize"], 8, True),
     (["--embeddings", "float"], 8, False)],
)  # fmt: skip
def test_quantize_cli_embeddings_modes_and_the_loaded_checkpoint(tmp_path, flags, bits, quantized):
    from slimlm.cli import main
    from slimlm.loading import load
    from tests.test_loading import _save_hf_dir

    _save_hf_dir(tmp_path / "src", "qwen2", None)  # tied
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(tmp_path / "src"), "--method", "rtn", "--bits", str(bits),
                 "--group-size", "32", "--out", str(out), "-q", *flags]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quantize_embeddings"] is quantized
    assert config["embeddings"] == ("auto" if not flags else flags[-1].removeprefix("--keep-embeddings-"))
    keep_float = not quantized
    model = load(str(out), progress=False).model
    embed = model.model.embed_tokens
    assert isinstance(embed, nn.Embedding if keep_float else QuantEmbedding)
    assert (model.lm_head.weight is embed.weight) if keep_float else (model.lm_head is embed.table)


def test_dequantize_model_restores_a_tied_float_embedding():
    from slimlm.train.merge import dequantize_model

    model = slimlm_from_hf(make_hf_model("llama-tied"))
    quantize_model(model, "rtn", 8, -1, progress=False, quantize_embeddings=True)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    quantized = _logits(model, ids)
    table = model.model.embed_tokens.dequantized_table()
    dequantize_model(model, torch.float32)
    embed = model.model.embed_tokens
    assert type(embed) is nn.Embedding and model.lm_head.weight is embed.weight
    assert torch.equal(embed.weight, table)
    torch.testing.assert_close(_logits(model, ids), quantized, rtol=3e-2, atol=3e-2)
