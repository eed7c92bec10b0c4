"""Constrained decoding in the engine on the real SmolLM2 model, checked with jsonschema / re / Lark."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance", reason="constrained decoding needs: pip install 'slimlm[structured]'")
jsonschema = pytest.importorskip("jsonschema")

from slimlm.engine.llm import LLM  # noqa: E402
from slimlm.engine.params import SamplingParams  # noqa: E402
from slimlm.engine.structured import StructuredOutputs  # noqa: E402
from slimlm.errors import SlimlmError  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm():
    """bf16 on the C decode kernel where it runs (its logits are masked like the PyTorch path's)."""
    from slimlm.loading import load

    loaded = load(None, dtype="bfloat16", progress=False)
    return LLM.from_loaded(
        loaded, kv_cache_tokens=4096, block_size=16, max_num_seqs=16, weights_layout="auto"
    )


@pytest.fixture(scope="module")
def prompt(llm):
    return llm.chat_prompt([{"role": "user", "content": "Describe a person as JSON."}])


def _params(spec: StructuredOutputs, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 48, "temperature": 1.0, **kw}, structured_outputs=spec)


def test_json_schema_samples_are_all_valid(llm, prompt):
    spec = StructuredOutputs(json=PERSON)
    outs = llm.generate([prompt] * 4, [_params(spec, seed=i) for i in range(4)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({o.text for o in outs}) > 1  # sampling still samples


def test_regex_choice_and_grammars(llm, prompt):
    specs = [
        (
            StructuredOutputs(regex=r"[A-Z][a-z]{2,6}-[0-9]{3}"),
            lambda t: re.fullmatch(r"[A-Z][a-z]{2,6}-[0-9]{3}", t),
        ),
        (StructuredOutputs(choice=["red", "green", "blue"]), lambda t: t in ("red", "green", "blue")),
        (
            StructuredOutputs(grammar='start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/'),
            lambda t: re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", t),
        ),
        (StructuredOutputs(grammar='root ::= "yes" | "no"'), lambda t: t in ("yes", "no")),  # GBNF
    ]
    outs = llm.generate([prompt] * len(specs), [_params(s, temperature=0, max_tokens=24) for s, _ in specs])
    for (spec, ok), out in zip(specs, outs, strict=True):
        assert out.finish_reason == "stop" and ok(out.text), (spec, out.text)


def test_constrained_rows_leave_unconstrained_rows_alone(llm, prompt):
    greedy = SamplingParams(max_tokens=16, temperature=0)
    alone = llm.generate([prompt], greedy)[0]
    mixed = llm.generate(
        [prompt, prompt, prompt],
        [
            _params(StructuredOutputs(json=PERSON), seed=1),
            greedy,
            _params(StructuredOutputs(choice=["a", "b"])),
        ],
    )
    assert mixed[1].token_ids == alone.token_ids
    assert alone.text != mixed[0].text


def test_seeded_constrained_sampling_is_reproducible(llm, prompt):
    params = _params(StructuredOutputs(json=PERSON), seed=42)
    assert llm.generate(prompt, params)[0].text == llm.generate(prompt, params)[0].text


def test_schema_cut_by_max_tokens_ends_with_length_and_partial_text(llm, prompt):
    long_list = {"type": "array", "items": {"type": "string", "minLength": 20}, "minItems": 50}
    out = llm.generate(prompt, _params(StructuredOutputs(json=long_list), max_tokens=12, seed=0))[0]
    assert out.finish_reason == "length"
    assert out.text.startswith("[") and len(out.token_ids) == 12
    assert llm.engine.constraints.matchers == {}  # forgotten when it finished


@pytest.mark.parametrize(
    "spec, words",
    [
        (lambda: StructuredOutputs(json={"type": "nonsense"}), "JSON schema"),
        (lambda: StructuredOutputs(json={"type": "string", "format": "no-such-format"}), "JSON schema"),
        (lambda: StructuredOutputs(regex="(?=a)b"), "regex"),  # lookahead: not a regular language
        (lambda: StructuredOutputs(grammar="start: missing_rule"), "grammar"),
        (lambda: StructuredOutputs(json="{not json"), "not valid JSON"),
        (lambda: StructuredOutputs(regex="a", choice=["a"]), "exactly one"),
        (lambda: StructuredOutputs(choice=[]), "non-empty list"),
    ],
)
def test_bad_specs_are_user_errors(llm, prompt, spec, words):
    with pytest.raises(SlimlmError, match=words):
        llm.generate(prompt, _params(spec()))
    assert not llm.engine.has_unfinished()


def test_beam_search_with_structured_output_is_refused():
    with pytest.raises(SlimlmError, match="beam search"):
        SamplingParams(num_beams=2, structured_outputs=StructuredOutputs(regex="a+"))


def test_unpacked_bitmask_matches_the_bit_layout_llguidance_writes():
    import torch

    from slimlm.engine.constraints import unpack_bitmask

    gen = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word is partly padding
    words = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
    tokens = torch.arange(vocab)
    expected = ((words[:, tokens // 32] >> (tokens % 32).to(torch.int32)) & 1).bool()
    assert torch.equal(unpack_bitmask(words, vocab), expected)
