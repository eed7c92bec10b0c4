"""The embedded model's greedy answers to 20 short factual chat questions: unchanged by int8 KV and by
the default int4 KV on at least 18 of 20 (issue 19), comparing each answer's first sentence (greedy,
12 tokens), and by the recommended 4-bit weight recipe on at least 16 of 20. Prints the answers that
changed.

The KV tests run the model in float32 against a float32 pool, so that what changes is the KV format's
doing: in bf16 the model's own roundings already change 2 of the 20 answers against float32 (the
spider's legs, the continents; 2026-12-04), and a bf16 model over an int8 pool on the C kernel changes
5 of 20 against the bf16 pool, 2 of them the same low-margin answers (docs/kv_cache.md)."""

from __future__ import annotations

import pytest

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "What is the largest planet in the solar system?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "How many legs does a spider have?",
    "What is the chemical symbol for gold?",
    "What is 7 times 8?",
    "Which ocean is the largest?",
    "What is the freezing point of water in Fahrenheit?",
    "What language is spoken in Brazil?",
    "What is the tallest mountain on Earth?",
    "How many continents are there?",
    "What gas do plants absorb from the air?",
    "Who painted the Mona Lisa?",
    "What is the square root of 81?",
    "What is the currency of the United Kingdom?",
    "How many minutes are in an hour?",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def _first_sentence(text: str) -> str:
    """The answer: its first sentence (short factual answers are one sentence)."""
    text = text.strip()
    ends = [i for i in (text.find(". "), text.find(".\n"), text.find("\n")) if i >= 0]
    return text[: min(ends) + 1] if ends else text


@pytest.fixture(scope="module")
def bf16_model():
    from slimlm.loading import load

    return load(None, dtype="bfloat16", progress=False)


def _answers(loaded, kv_dtype: str) -> list[str]:
    tok = loaded.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in QUESTIONS
    ]
    llm = LLM.from_loaded(loaded, kv_cache_tokens=4096, kv_dtype=kv_dtype)
    return [_first_sentence(o.text) for o in llm.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def reference(bf16_model):
    return _answers(bf16_model, "bf16")


@pytest.fixture(scope="module")
def f32_model():
    from slimlm.loading import load

    return load(None, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def f32_reference(f32_model):
    return _answers(f32_model, "fp32")


# int4: KIVI keys, the unfinished block and the first 32 tokens (attention sinks) in bf16, turned; without
# the sinks it changed 6 of 20 (docs/kv_cache.md)
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_quantized_kv_keeps_the_answers(f32_model, f32_reference, kv_dtype):
    answers = _answers(f32_model, kv_dtype)
    changed = [(q, a, b) for q, a, b in zip(QUESTIONS, f32_reference, answers, strict=True) if a != b]
    for q, a, b in changed:
        print(f"{kv_dtype} changed {q!r}: fp32 {a!r} -> {b!r}")
    assert "Paris" in answers[0]
    assert len(changed) <= 2, changed


def test_recommended_w4_keeps_the_answers(bf16_model, reference):
    """The recommended 4-bit recipe (docs/quantization.md: RTN, group 32, float zero points, 8-bit
    embedding table) changes at most 4 of the 20 answers of the bf16 model with a bf16 pool."""
    import copy

    from slimlm.quant.quantize import quantize_model

    quantized = copy.copy(bf16_model)
    quantized.model = copy.deepcopy(bf16_model.model)
    quantize_model(quantized.model, "rtn", 4, 32, progress=False, float_zero=True, embedding_bits=8)
    answers = _answers(quantized, "bf16")
    changed = [(q, a, b) for q, a, b in zip(QUESTIONS, reference, answers, strict=True) if a != b]
    for q, a, b in changed:
        print(f"w4 changed {q!r}: bf16 {a!r} -> {b!r}")
    assert "Paris" in answers[0]
    assert len(changed) <= 4, changed
