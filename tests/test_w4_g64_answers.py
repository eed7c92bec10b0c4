"""Whether the recommended group-64 4-bit method (docs/quantization.md: AWQ's scales folded, then GPTQ,
8-bit embedding table) keeps the embedded model's greedy answers to the 20 factual questions of
tests/test_kv_answers.py on at least 16 of 20 (it does not yet: xfail); prints the ones that changed. Calibration (16 x 512
tokens of the pydoc calibration slice, as benchmarks/weight_fidelity.py) takes minutes on two cores, so
this runs only with SLIMLM_SLOW_TESTS=1."""

from __future__ import annotations

import copy
import os

import pytest

from tests.test_kv_answers import QUESTIONS, _answers, bf16_model, reference  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(
    not os.environ.get("SLIMLM_SLOW_TESTS"), reason="minutes of AWQ + GPTQ calibration on SmolLM2"
)


@pytest.mark.xfail(
    reason="measured 2026-12-04: 15 of 20 first sentences changed (top-1 agreement 0.86 per token over "
    "12 greedy tokens); at g64 only the 5.35-bit mixed recipes or g32 come near; the g32 recipe passes "
    "(tests/test_kv_answers.py::test_recommended_w4_keeps_the_answers)",
    strict=False,
)
def test_awq_gptq_g64_keeps_the_answers(bf16_model, reference, rotate=None):  # noqa: F811
    from slimlm.quant.calibration import calibration_batches
    from slimlm.quant.quantize import quantize_model

    quantized = copy.copy(bf16_model)
    quantized.model = copy.deepcopy(bf16_model.model).float()
    tok = bf16_model.tokenizer
    calib = calibration_batches(lambda s: tok.encode(s, add_special_tokens=False), num_samples=16)
    quantize_model(quantized.model, "awq-gptq", 4, 64, calib, progress=False, embedding_bits=8, rotate=rotate)
    quantized.model.to(bf16_model.model.model.norm.weight.dtype)
    quantized.config = quantized.model.config  # a rotation unties the table
    answers = _answers(quantized, "bf16")
    changed = [(q, a, b) for q, a, b in zip(QUESTIONS, reference, answers, strict=True) if a != b]
    for q, a, b in changed:
        print(f"w4 awq-gptq g64 (rotate {rotate}) changed {q!r}: bf16 {a!r} -> {b!r}")
    assert len(changed) <= 4, changed


@pytest.mark.xfail(
    reason="measured 2026-12-04: 11 of 20 first sentences changed (AWQ + GPTQ: 15); 'Paris' kept",
    strict=False,
)
def test_imatrix_rtn_g64_answers(bf16_model, reference):  # noqa: F811
    """The g64 method with the lowest loss on both held-out texts (docs/quantization.md): RTN on grids
    searched with the importance matrix, float zero points, 8-bit table. Prints the changed answers; the
    bar is the issue's 16 of 20 kept, which it does not reach yet (xfail)."""
    from slimlm.quant.calibration import calibration_batches
    from slimlm.quant.quantize import quantize_model

    quantized = copy.copy(bf16_model)
    quantized.model = copy.deepcopy(bf16_model.model).float()
    tok = bf16_model.tokenizer
    calib = calibration_batches(lambda s: tok.encode(s, add_special_tokens=False), num_samples=16)
    quantize_model(quantized.model, "rtn", 4, 64, calib, progress=False, embedding_bits=8, float_zero=True,
                   scale_search="imatrix")  # fmt: skip
    quantized.model.to(bf16_model.model.model.norm.weight.dtype)
    answers = _answers(quantized, "bf16")
    changed = [(q, a, b) for q, a, b in zip(QUESTIONS, reference, answers, strict=True) if a != b]
    for q, a, b in changed:
        print(f"w4 rtn imatrix g64 changed {q!r}: bf16 {a!r} -> {b!r}")
    print(f"w4 rtn imatrix g64: {len(changed)} of {len(QUESTIONS)} first sentences changed")
    assert len(changed) <= 4, changed
