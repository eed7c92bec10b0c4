"""Rotation before quantization (slimlm/quant/rotate.py) and AWQ + GPTQ: the rotated float model against
transformers' logits of the original, refusals, and rotated + quantized checkpoints through save/load and
the C decode kernel."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quant.format import load_quantized_state, save_quantized
from slimlm.quant.quantize import quantize_model
from slimlm.quant.rotate import hadamard_matrix, random_rotation, rotate_model
from tests.tiny_models import make_hf_model, slimlm_from_hf

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))


def _calib(vocab=128):
    return [torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]


@pytest.mark.parametrize("n", [12, 20, 64, 96, 576, 768])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=h.dtype), rtol=0, atol=0)
    q = random_rotation(n, "hadamard", seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=q.dtype), rtol=0, atol=1e-12)


def test_sizes_without_a_hadamard_matrix_are_refused_or_take_a_random_rotation():
    assert hadamard_matrix(9) is None and hadamard_matrix(896) is None
    with pytest.raises(SlimlmError, match="use --rotate orthogonal"):
        random_rotation(9, "hadamard")
    q = random_rotation(9, "orthogonal")
    torch.testing.assert_close(q @ q.T, torch.eye(9, dtype=q.dtype), rtol=0, atol=1e-12)
    with pytest.raises(SlimlmError, match="unknown rotation"):
        random_rotation(8, "givens")


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("arch", ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "phi3"])
def test_rotated_float_model_gives_the_original_logits(arch, kind):
    hf = make_hf_model(arch)
    model = slimlm_from_hf(hf)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    record = rotate_model(model, kind, seed=2)
    with torch.no_grad():
        expected, got = hf(IDS).logits, model.forward_dense(IDS)
    assert (got - expected).abs().max() <= 1e-4
    assert record == {"kind": kind, "seed": 2, "heads": True, "untied": tied}
    # the architecture is unchanged: norms are ones now, a tied table became two
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones(64)) for layer in model.model.layers)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    # and the weights really moved (a rotation, not the identity)
    assert not torch.allclose(model.model.embed_tokens.weight, hf.model.embed_tokens.weight, atol=1e-3)


@pytest.mark.parametrize("arch", ["gemma3", "gemma3-plain"])
def test_gemma3_is_refused_and_left_untouched(arch):
    model = slimlm_from_hf(make_hf_model(arch))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SlimlmError, match="cannot rotate this model.*Gemma"):
        rotate_model(model)
    with pytest.raises(SlimlmError, match="cannot rotate"):
        quantize_model(model, "rtn", 4, 32, progress=False, rotate="hadamard")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_quantized_model_is_not_rotated():
    model = slimlm_from_hf(make_hf_model("llama"))
    quantize_model(model, "rtn", 4, 32, progress=False)
    with pytest.raises(SlimlmError, match="float"):
        rotate_model(model)


def _relative_error(model, reference):
    with torch.no_grad():
        a, b = model.forward_dense(IDS), reference.forward_dense(IDS)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq-gptq"])
def test_rotated_quantized_checkpoint_saves_and_loads(tmp_path, method):
    hf = make_hf_model("llama-tied")
    reference = slimlm_from_hf(hf)
    model = slimlm_from_hf(hf)
    calib = None if method == "rtn" else _calib()
    config = quantize_model(model, method, 4, 32, calib, progress=False, rotate="hadamard", embedding_bits=8)
    assert config["rotate"]["untied"] and config["method"] == method
    assert _relative_error(model, reference) < 0.15
    save_quantized(model, config, tmp_path / "q", model.config.to_hf_dict())
    skeleton = slimlm_from_hf(make_hf_model("llama-tied", seed=7))
    skeleton.lm_head = nn.Linear(64, 128, bias=False)  # untied on disk: lm_head.* is read, not the table
    state = load_file(tmp_path / "q" / "model.safetensors")
    assert any(k.startswith("lm_head.") for k in state)
    rest = load_quantized_state(skeleton, state, config)
    skeleton.load_state_dict(rest, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(skeleton.forward_dense(IDS), model.forward_dense(IDS))


def test_awq_then_gptq_beats_rtn_on_a_tiny_model():
    hf = make_hf_model("llama")
    reference = slimlm_from_hf(hf)
    errors = {}
    for method in ("rtn", "awq-gptq"):
        model = slimlm_from_hf(hf)
        quantize_model(model, method, 4, 32, None if method == "rtn" else _calib(), progress=False)
        errors[method] = _relative_error(model, reference)
    assert errors["awq-gptq"] < errors["rtn"], errors


def test_rotated_quantized_model_runs_on_the_c_kernel():
    from slimlm.kernels import build

    if build.load_kernel("decode_cpu") is None:
        pytest.skip(f"C kernel unavailable: {build.kernel_unavailable_reason('decode_cpu')}")
    from tests.engine.test_decode_kernel_quant import (
        check_against_reference,
        dequantized_reference,
        kernel_decoder,
        tiny,
    )

    model = tiny("llama", tied=True)  # hidden 128, head_dim 32
    quantize_model(model, "gptq", 4, 64, _calib(256), progress=False, rotate="hadamard", embedding_bits=8,
                   float_zero=True)  # fmt: skip
    model = model.to(torch.bfloat16)
    assert not model.model.embed_tokens.tied  # untied: the kernel reads its own quantized head
    reference = dequantized_reference(model)
    decoder, _ = kernel_decoder(model)
    check_against_reference(reference, decoder)
