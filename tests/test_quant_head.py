"""The lm_head with calibration (quant/head.py): GPTQ and AWQ against RTN, the tied lookup side, the
--embeddings auto rule, and a real loader round trip of an AWQ head's lookup scale."""

from __future__ import annotations

import copy

import pytest
import torch

from slimlm.formats.weights import quantize_embeddings_for
from slimlm.quant.embedding import QuantEmbedding
from slimlm.quant.format import save_quantized
from slimlm.quant.head import final_norm, quantize_head
from slimlm.quant.quantize import quantize_model
from slimlm.quant.stats import InputStats
from tests.tiny_models import make_hf_model, slimlm_from_hf


def _head_inputs(model, ids):
    """What the float lm_head reads on `ids` (the final norm's outputs), [tokens, hidden]."""
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model.forward_dense(ids) if hasattr(model, "forward_dense") else model(ids)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def _quantized_heads(arch, bits=4, group_size=32, scale=True):
    """{method: (model with only its head/embedding quantized, float model, head inputs)}."""
    hf = make_hf_model(arch)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(11))
    x = _head_inputs(hf, ids)
    out = {}
    for method in ("rtn", "awq", "gptq"):
        model = copy.deepcopy(hf)
        quantize_head(model, method, InputStats.of(x), bits, group_size, sym=bits == 8, scale=scale)
        out[method] = model
    return hf, ids, x, out


def _head_error(model, float_model, x):
    """‖head(x) − float head(x)‖ / ‖float head(x)‖, with the norm fold undone on the quantized side."""
    with torch.no_grad():
        reference = float_model.lm_head(x)
        fold = final_norm(model).weight / float_model.model.norm.weight  # AWQ's 1/s (1 otherwise)
        return float((model.lm_head(x * fold) - reference).norm() / reference.norm())


@pytest.mark.parametrize("arch", ["llama-tied", "llama"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, -1)])
@pytest.mark.parametrize("scale", [True, None])
def test_calibrated_heads_beat_rtn_on_their_inputs(arch, bits, group_size, scale):
    hf, _, x, heads = _quantized_heads(arch, bits, group_size, scale)
    errors = {m: _head_error(model, hf, x) for m, model in heads.items()}
    assert errors["gptq"] < errors["rtn"], errors
    # at 8 bits per channel the rounding error is already tiny: AWQ may only tie with RTN there
    assert errors["awq"] < errors["rtn"] * (1 if bits == 4 else 1.02), errors
    assert all(isinstance(m.model.embed_tokens, QuantEmbedding) for m in heads.values())
    # by default (None) a tied head gets clipping only: the lookup scale cost more than it saved
    assert (heads["awq"].model.embed_tokens.lookup_scale is not None) is (
        arch == "llama-tied" and bool(scale)
    )
    assert (final_norm(heads["awq"]).weight != hf.model.norm.weight).any().item() is (
        bool(scale) or arch == "llama"
    )


def test_tied_lookups_stay_close_to_rtn_lookups():
    """GPTQ and AWQ shape the shared table for the head; the rows looked up must not get much worse."""
    hf, _, _, heads = _quantized_heads("llama-tied")
    weight = hf.model.embed_tokens.weight.detach()
    ids = torch.arange(weight.shape[0])
    errors = {m: float((model.model.embed_tokens(ids) - weight).norm() / weight.norm())
              for m, model in heads.items()}  # fmt: skip
    assert errors["gptq"] < 2 * errors["rtn"] and errors["awq"] < 2 * errors["rtn"], errors


def test_auto_rule_quantizes_embeddings_at_both_widths():
    # auto quantizes the table at 8 bits too since it is an int8 g32 table (docs/quantization.md)
    assert quantize_embeddings_for("auto", 4) and quantize_embeddings_for("auto", 8)
    assert quantize_embeddings_for(None, 4) and quantize_embeddings_for("quantize", 8)
    assert not quantize_embeddings_for("float", 4) and quantize_embeddings_for(True, 8)
    assert not quantize_embeddings_for("float", 8)
    for bits, group in [(4, 32), (8, -1)]:
        model = slimlm_from_hf(make_hf_model("llama-tied"))
        config = quantize_model(model, "rtn", bits, group, progress=False)
        assert config["embeddings"] == "auto" and config["quantize_embeddings"] is True
        assert isinstance(model.model.embed_tokens, QuantEmbedding)
    config = quantize_model(slimlm_from_hf(make_hf_model("llama")), "rtn", 8, -1, progress=False,
                            quantize_embeddings=True)  # fmt: skip
    assert config["embeddings"] == "quantize" and config["quantize_embeddings"] is True


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_awq_tied_lookup_scale_survives_the_loader(tmp_path, dtype):
    from slimlm.loading import load
    from tests.test_loading import _write_tiny_tokenizer

    model = slimlm_from_hf(make_hf_model("llama-tied"))
    calib = [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))]
    config = quantize_model(model, "awq", 4, 32, calib, progress=False, quantize_embeddings=False)
    quantize_head(
        model, "awq", InputStats.of(_head_inputs(model, torch.cat(calib))), 4, 32, False, scale=True
    )
    config.update(embeddings="quantize", quantize_embeddings=True, head_method="awq")
    scale = model.model.embed_tokens.lookup_scale
    assert scale is not None and torch.equal(scale, scale.to(torch.bfloat16).float())  # exact in bf16
    save_quantized(model, config, tmp_path)
    _write_tiny_tokenizer(tmp_path)
    loaded = load(str(tmp_path), dtype=dtype, progress=False).model
    embed = loaded.model.embed_tokens
    assert embed.tied and loaded.lm_head is embed.table and torch.equal(embed.lookup_scale.float(), scale)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    model.to(getattr(torch, dtype))
    assert torch.equal(embed(ids), model.model.embed_tokens(ids))
    if dtype == "float32":  # (bf16: the loader keeps fp32 RoPE tables, a cast model does not)
        with torch.no_grad():
            assert torch.equal(loaded.forward_dense(ids), model.forward_dense(ids))


def test_dequantizing_an_awq_tied_head_keeps_the_tie_and_the_logits():
    from slimlm.train.merge import dequantize_model

    model = slimlm_from_hf(make_hf_model("llama-tied"))
    calib = [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))]
    quantize_model(model, "awq", 4, 32, calib, progress=False, quantize_embeddings=False)
    quantize_head(
        model, "awq", InputStats.of(_head_inputs(model, torch.cat(calib))), 4, 32, False, scale=True
    )
    assert model.model.embed_tokens.lookup_scale is not None
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        quantized = model.forward_dense(ids)
        dequantize_model(model, torch.float32)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        torch.testing.assert_close(model.forward_dense(ids), quantized, rtol=3e-2, atol=3e-2)
