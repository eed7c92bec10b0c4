"""slimlm.tokenizer against transformers (the oracle) on the embedded SmolLM2 GGUF and HF tokenizer
directories: encoding, decoding, special tokens, chat templates, streaming detokenization, bad input.
Tiny synthetic vocabularies are tested in test_tokenizer_synthetic.py."""

from __future__ import annotations

import json
import random
import shutil

import pytest

transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")  # a transformers dependency; used by the llama.cpp-style oracle

from pydoc_data.topics import topics  # noqa: E402

from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.tokenizer import IncrementalDecoder, Tokenizer, read_gguf_metadata  # noqa: E402
from slimlm.tokenizer.gguf_vocab import bytes_to_unicode  # noqa: E402
from tests.tokenizer_cases import (  # noqa: E402
    CONVERSATIONS,
    SAMPLES,
    UNICODE_SAMPLES,
    assert_same_as_transformers,
    check_stream,
    stream,
)

# ---------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol_fields(smollm_path):
    # the fast reader; test_gguf_metadata_readers_agree checks it against gguf.GGUFReader
    return read_gguf_metadata(smollm_path)


@pytest.fixture(scope="module")
def smol(smol_fields):
    return Tokenizer.from_gguf(smol_fields)


def digit_split_can_matter(text: str) -> bool:
    """Where SmolLM's one-digit split (kept by llama.cpp, dropped by transformers' GGUF converter) can
    change the tokens: whitespace runs before a digit, and non-ASCII numerals (whose bytes can merge)."""
    return regex.search(r"\s\s\p{N}|(?![0-9])\p{N}", text) is not None


def test_smollm_gguf_encode_matches_transformers(smol, hf_smollm_tokenizer):
    compared = 0
    for text in SAMPLES:
        for add_special in (True, False):
            ours = smol.encode(text, add_special_tokens=add_special)
            if not digit_split_can_matter(text):
                assert ours == hf_smollm_tokenizer.encode(text, add_special_tokens=add_special), text
                compared += 1
    assert compared >= 0.8 * 2 * len(SAMPLES)
    assert smol.batch_encode(SAMPLES[:20]) == [smol.encode(t) for t in SAMPLES[:20]]


def llama_cpp_style_encode(fields: dict, text: str, cache: dict) -> list[int]:
    """An independent reading of llama.cpp's SMOLLM pre-tokenizer (isolate each \\p{N}, then the GPT-2
    regex) followed by plain BPE over the file's merges. Special tokens are not handled."""
    if "ranks" not in cache:
        cache["ranks"] = {tuple(m.split(" ")): i for i, m in enumerate(fields["tokenizer.ggml.merges"])}
        cache["vocab"] = {t: i for i, t in enumerate(fields["tokenizer.ggml.tokens"])}
    ranks, vocab, spelling = cache["ranks"], cache["vocab"], bytes_to_unicode()
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
    pieces = []
    for part in regex.split(r"(\p{N})", text):
        pos = 0
        for match in gpt2.finditer(part):
            pieces += [part[pos : match.start()], match.group()]
            pos = match.end()
        pieces.append(part[pos:])
    ids = []
    for piece in filter(None, pieces):
        symbols = [spelling[b] for b in piece.encode()]
        while len(symbols) > 1:
            pairs = [
                (ranks.get((a, b), 1 << 30), i)
                for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))
            ]
            rank, at = min(pairs)
            if rank == 1 << 30:
                break
            symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
        ids += [vocab[s] for s in symbols]
    return ids


def test_smollm_digit_split_follows_llama_cpp(smol, smol_fields):
    cache: dict = {}
    paragraphs = [p for text in topics.values() for p in text.split("\n\n")]
    texts = [t for t in SAMPLES if "<|" not in t] + [p for p in paragraphs if digit_split_can_matter(p)]
    assert len(texts) > 300
    for text in texts:
        assert smol.encode(text) == llama_cpp_style_encode(smol_fields, text, cache), text[:80]
    # whitespace before digits stays one run, as in SmolLM2's own tokenizer.json (Digits + ByteLevel)
    assert smol.convert_ids_to_tokens(smol.encode("x  12")) == ["x", "ĠĠ", "1", "2"]


def test_smollm_decode_matches_transformers(smol, hf_smollm_tokenizer):
    rng = random.Random(0)
    id_lists = [hf_smollm_tokenizer.encode(t) for t in SAMPLES[::5]]
    id_lists += [[rng.randrange(smol.vocab_size) for _ in range(rng.randint(1, 30))] for _ in range(200)]
    id_lists += [[1, 2, 0, 3, 100], [2], []]  # special tokens only / mixed
    for ids in id_lists:
        for skip in (True, False):
            assert smol.decode(ids, skip_special_tokens=skip) == hf_smollm_tokenizer.decode(
                ids, skip_special_tokens=skip
            )


def test_smollm_special_tokens_and_vocab_match_transformers(smol, hf_smollm_tokenizer):
    hf = hf_smollm_tokenizer

    def added(backend):
        return {i: (str(t.content), t.special) for i, t in backend.get_added_tokens_decoder().items()}

    assert added(smol.backend) == added(hf.backend_tokenizer)
    assert smol.vocab_size == len(hf) == 49152
    assert (smol.bos_token_id, smol.pad_token_id, smol.unk_token_id) == (
        hf.bos_token_id,
        hf.pad_token_id,
        hf.unk_token_id,
    )
    assert smol.eos_token_ids == [hf.eos_token_id]
    assert smol.special_tokens == hf.special_tokens_map
    ids = list(range(0, smol.vocab_size, 97))
    assert smol.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert smol.convert_ids_to_tokens(1) == "<|im_start|>"
    assert smol.token_to_id("<|im_end|>") == 2 and smol.token_to_id("no such token") is None
    assert smol.encode("<|im_start|>user") == [
        1,
        hf.convert_tokens_to_ids("user"),
    ]  # one id per special token


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm_chat_template_matches_transformers(
    smol, hf_smollm_tokenizer, conversation, add_generation_prompt
):
    kwargs = {"add_generation_prompt": add_generation_prompt}
    expected = hf_smollm_tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
    assert smol.apply_chat_template(conversation, **kwargs) == expected
    expected_ids = hf_smollm_tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=False, **kwargs
    )
    assert smol.apply_chat_template(conversation, tokenize=True, **kwargs) == expected_ids


def test_continue_final_message_matches_transformers(smol, hf_smollm_tokenizer):
    chat = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}]
    expected = hf_smollm_tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert (
        smol.apply_chat_template(chat, add_generation_prompt=False, continue_final_message=True) == expected
    )
    assert expected.endswith("One, two,")


FEATURE_TEMPLATE = """\
{%- set ns = namespace(turns=0) -%}
{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    [{{ message.role | upper }}] {{ message.content | trim }}
    {% if message.reasoning_content is defined %}(thought: {{ message.reasoning_content }}){% endif %}
    {% if message.name is defined %}(name: {{ message.name }}){% endif %}
    {% if message.role == 'stop' %}{% break %}{% endif %}
{% endfor %}
{% if tools %}TOOLS {{ tools | tojson }} / {{ tools[0] | tojson(indent=2, sort_keys=true) }}{% endif %}
{% if documents %}{% for d in documents %}DOC {{ d.title }}: {{ d.text }}{% endfor %}{% endif %}
{% generation %}turns={{ ns.turns }} mode={{ mode | default('none') }} year_digits={{ strftime_now('%Y') | length }}{% endgeneration %}
{{ dict(a=1) | tojson }} {{ eos_token }}{% if add_generation_prompt %}>>>{% endif %}
"""


def test_jinja_environment_matches_transformers(smol, hf_smollm_tokenizer):
    messages = [
        {"role": "system", "content": '  <html> & "quotes" é  '},
        {"role": "skip", "content": "ignored"},
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "ok", "thinking": "hmm", "name": "bot"},
        {"role": "stop", "content": "last"},
        {"role": "user", "content": "after break"},
    ]
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "description": "ü <b>", "parameters": {"z": 1, "a": 2}},
        }
    ]
    documents = [{"title": "T", "text": "body"}]
    for agp in (True, False):
        kwargs = dict(tools=tools, documents=documents, add_generation_prompt=agp, mode="fast")
        expected = hf_smollm_tokenizer.apply_chat_template(
            messages, chat_template=FEATURE_TEMPLATE, tokenize=False, **kwargs
        )
        got = smol.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, **kwargs)
        assert got == expected
    assert "(thought: hmm)" in got and "(name: None)" not in got and "after break" not in got


def test_template_errors_are_slimlm_errors(smol):
    refuse = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}"
    with pytest.raises(SlimlmError, match="must start with a user turn"):
        smol.apply_chat_template([{"role": "assistant", "content": "x"}], chat_template=refuse)
    with pytest.raises(SlimlmError, match="not valid Jinja"):
        smol.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(SlimlmError, match="underscore"):
        smol.apply_chat_template(
            [{"role": "user", "content": "x"}], chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}"
        )


# ------------------------------------------------------------------------------------- HF directories


def test_hf_dir_from_save_pretrained_matches_transformers(hf_smollm_tokenizer, tmp_path):
    hf_smollm_tokenizer.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert_same_as_transformers(ours, reloaded, SAMPLES)  # same tokenizer.json on both sides: every sample
    assert ours.special_tokens == reloaded.special_tokens_map
    assert ours.eos_token_ids == [2]


def test_hf_dir_legacy_config_matches_transformers(hf_smollm_tokenizer, tmp_path):
    """An older layout: template inside tokenizer_config.json, tokens as AddedToken dicts,
    special_tokens_map.json, an extra special token that tokenizer.json does not list."""
    hf_smollm_tokenizer.save_pretrained(tmp_path)
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    token = {
        "__type": "AddedToken",
        "content": "<|im_end|>",
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": token}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    stm = {
        "bos_token": "<|im_start|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|brand_new|>"],
    }
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(stm))
    ours = Tokenizer.from_hf_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.token_to_id("<|brand_new|>") == hf.convert_tokens_to_ids("<|brand_new|>") == 49152
    assert_same_as_transformers(ours, hf, SAMPLES[::4] + ["a<|brand_new|>b"])


# ------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_decoder_smollm(smol, skip):
    for text in UNICODE_SAMPLES + SAMPLES[:40]:
        check_stream(smol, smol.encode(text), skip, text_is_valid=True)
    chat = smol.apply_chat_template(CONVERSATIONS[2], tokenize=True)
    check_stream(smol, chat, skip, text_is_valid=True)
    rng = random.Random(2)
    for _ in range(100):  # arbitrary ids: invalid UTF-8, specials anywhere
        check_stream(
            smol,
            [rng.randrange(smol.vocab_size) for _ in range(rng.randint(1, 25))],
            skip,
            text_is_valid=False,
        )
    emoji = smol.encode("👨‍👩‍👧‍👦")
    assert len(emoji) > 1 and stream(smol, emoji, skip)[0] == ""  # the first piece is an incomplete character


# ------------------------------------------------------------------------------------------- bad input


def test_bad_hf_dirs(tmp_path):
    with pytest.raises(SlimlmError, match="not a directory"):
        Tokenizer.from_hf_dir(tmp_path / "missing")
    with pytest.raises(SlimlmError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(SlimlmError, match="not a valid tokenizers file"):
        Tokenizer.from_hf_dir(tmp_path)


def test_bad_gguf_metadata(smol_fields, tmp_path):
    with pytest.raises(SlimlmError, match=r"tokenizer model 'bert' is not supported; supported: gpt2.*llama"):
        Tokenizer.from_gguf({**smol_fields, "tokenizer.ggml.model": "bert"})
    with pytest.raises(SlimlmError, match="pre-tokenizer 'mystery' is not supported"):
        Tokenizer.from_gguf({**smol_fields, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(SlimlmError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(SlimlmError, match="not a token id"):
        Tokenizer.from_gguf({**smol_fields, "tokenizer.ggml.eos_token_id": 10**6})
    with pytest.raises(SlimlmError, match="merges"):
        Tokenizer.from_gguf({k: v for k, v in smol_fields.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(SlimlmError, match="dict of GGUF metadata"):
        Tokenizer.from_gguf([("tokenizer.ggml.model", "gpt2")])
    shutil.copyfile(__file__, tmp_path / "fake.gguf")
    with pytest.raises(SlimlmError, match="not a GGUF file"):
        Tokenizer.from_gguf_file(tmp_path / "fake.gguf")
    with pytest.raises(SlimlmError, match="not a readable GGUF"):
        Tokenizer.from_gguf_file(tmp_path / "missing.gguf")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "must be a list"),
        ({"role": "user", "content": "x"}, "must be a list"),
        ([], "empty"),
        (["hello"], "message 0 is a str"),
        ([{"content": "x"}], "no 'role'"),
        ([{"role": "user"}], "has no 'content'"),
        ([{"role": "user", "content": 42}], "of type int"),
        (
            [{"role": "user", "content": "ok"}, {"role": "assistant", "content": ["bare string part"]}],
            "message 1",
        ),
    ],
)
def test_malformed_messages(smol, messages, match):
    with pytest.raises(SlimlmError, match=match):
        smol.apply_chat_template(messages)


def test_other_misuse(smol):
    no_template = Tokenizer(smol.backend, smol.special_tokens, chat_template=None)
    with pytest.raises(SlimlmError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(SlimlmError, match="outside the vocabulary"):
        smol.decode([1, smol.vocab_size])
    with pytest.raises(SlimlmError, match="outside the vocabulary"):
        smol.convert_ids_to_tokens(-1)
    with pytest.raises(SlimlmError, match="outside the vocabulary"):
        IncrementalDecoder(smol).push(smol.vocab_size)
    with pytest.raises(SlimlmError, match="takes a str"):
        smol.encode(["a list"])
    with pytest.raises(SlimlmError, match="list of str"):
        smol.batch_encode("one string")
    with pytest.raises(SlimlmError, match="cannot both be set"):
        smol.apply_chat_template([{"role": "user", "content": "x"}], continue_final_message=True)
