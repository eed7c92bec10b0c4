"""slimlm.tokenizer against transformers on tiny GGUF vocabularies trained here (Llama-3 and Qwen2
byte-level BPE, SentencePiece with byte fallback): GGUF and HF-directory loading, BOS rules, chat
templates, streaming detokenization, the GGUF metadata readers."""

from __future__ import annotations

import random

import pytest

transformers = pytest.importorskip("transformers")

import gguf  # noqa: E402

from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.tokenizer import Tokenizer, gguf_fields, read_gguf_metadata  # noqa: E402
from slimlm.tokenizer.gguf_vocab import bytes_to_unicode  # noqa: E402
from tests.tokenizer_cases import (  # noqa: E402
    CONVERSATIONS,
    SYNTHETIC,
    SYNTHETIC_TEXTS,
    UNICODE_SAMPLES,
    UNSEEN_SAMPLES,
    assert_same_as_transformers,
    check_stream,
    write_gguf,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """name -> (our tokenizer from the GGUF file, transformers' tokenizer from the same file, the file)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, make_fields in SYNTHETIC.items():
        path = write_gguf(root / f"{name}.gguf", make_fields())
        hf = transformers.AutoTokenizer.from_pretrained(str(root), gguf_file=path.name)
        out[name] = (Tokenizer.from_gguf_file(path), hf, path)
    return out


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_gguf_matches_transformers(synthetic, name):
    ours, hf, _ = synthetic[name]
    texts = SYNTHETIC_TEXTS
    if name == "llama3":
        # transformers' GGUF converter adds GPT-2's default "<|endoftext|>" as an extra special token
        # (id 706 here) to byte-level vocabularies that lack it; llama.cpp and slimlm do not.
        assert hf.convert_tokens_to_ids("<|endoftext|>") == ours.vocab_size
        texts = [t for t in texts if "<|endoftext|>" not in t]
    for text in texts:
        for add_special in (True, False):
            assert ours.encode(text, add_special_tokens=add_special) == hf.encode(
                text, add_special_tokens=add_special
            ), text
        ids = hf.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert (ours.bos_token_id, ours.eos_token_ids) == (hf.bos_token_id, [hf.eos_token_id])
    tool_id = ours.token_to_id("<|tool|>")
    assert (
        ours.encode("a<|tool|>b", add_special_tokens=False).count(tool_id) == 1
    )  # user-defined: matched whole
    assert ours.decode([tool_id]) == "<|tool|>"  # ... but not special, so never skipped
    conversations = CONVERSATIONS
    if name == "sentencepiece":  # its (Mistral-style) template refuses system turns
        conversations = [c for c in CONVERSATIONS if all(m["role"] in ("user", "assistant") for m in c)]
    for conversation in conversations:
        for agp in (True, False):
            expected = hf.apply_chat_template(conversation, add_generation_prompt=agp, tokenize=False)
            assert ours.apply_chat_template(conversation, add_generation_prompt=agp) == expected


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_hf_dir_matches_transformers(synthetic, name, tmp_path):
    """The same tokenizers written by save_pretrained: BOS from tokenizer.json's post-processor (Llama-3,
    SentencePiece), Metaspace/byte-fallback decoders, templates from chat_template.jinja."""
    synthetic[name][1].save_pretrained(tmp_path)
    ours, hf = Tokenizer.from_hf_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    conversations = CONVERSATIONS if name != "sentencepiece" else CONVERSATIONS[::2]  # no system turns there
    assert_same_as_transformers(ours, hf, SYNTHETIC_TEXTS, conversations)
    if name != "qwen2":
        assert ours.encode("hi")[0] == ours.bos_token_id


def test_gguf_metadata_readers_agree(synthetic):
    for _, _, path in synthetic.values():
        from_reader = gguf_fields(gguf.GGUFReader(str(path)))
        assert from_reader["tokenizer.ggml.tokens"] and isinstance(
            from_reader["tokenizer.ggml.bos_token_id"], int
        )
        assert read_gguf_metadata(path) == {k: v for k, v in from_reader.items() if not k.startswith("GGUF.")}


def test_synthetic_bos_rules(synthetic):
    llama3, sentencepiece, qwen2 = (
        synthetic["llama3"][0],
        synthetic["sentencepiece"][0],
        synthetic["qwen2"][0],
    )
    assert (
        llama3.encode("hi")[0] == llama3.bos_token_id
        and llama3.encode("hi", add_special_tokens=False)[0] != llama3.bos_token_id
    )
    assert (
        sentencepiece.encode("hi")[0] == 1
    )  # SentencePiece Llama GGUFs add <s> unless the file says otherwise
    assert qwen2.bos_token_id not in qwen2.encode("hi")
    with pytest.raises(SlimlmError, match="Only user and assistant roles"):
        sentencepiece.apply_chat_template([{"role": "system", "content": "x"}])


def test_llama3_pre_tokenizer_prefers_whole_vocabulary_words():
    """llama.cpp and Llama-3's tokenizer.json set ignore_merges: a word in the vocabulary is one token
    even when the merges would build it differently; GPT-2-style vocabularies apply the merges."""
    spelled = [bytes_to_unicode()[b] for b in range(256)]
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": spelled + ["bc", "ab", "abc"],
        "tokenizer.ggml.merges": ["b c", "a b", "ab c"],
    }
    llama3 = Tokenizer.from_gguf({**fields, "tokenizer.ggml.pre": "llama-bpe"})
    gpt2 = Tokenizer.from_gguf({**fields, "tokenizer.ggml.pre": "gpt2"})
    assert llama3.convert_ids_to_tokens(llama3.encode("abc", add_special_tokens=False)) == ["abc"]
    assert gpt2.convert_ids_to_tokens(gpt2.encode("abc")) == ["a", "bc"]


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_incremental_decoder_synthetic(synthetic, name):
    ours = synthetic[name][0]
    rng = random.Random(1)
    texts = UNICODE_SAMPLES + UNSEEN_SAMPLES + ["a <|tool|> b", "x</s> y<s> z", " lead", "<s> after special"]
    for text in texts:
        ids = ours.encode(text)
        for skip in (True, False):
            check_stream(ours, ids, skip, text_is_valid=True)
    if name == "sentencepiece":
        assert any(i in ours.byte_fallback_ids for i in ours.encode(UNSEEN_SAMPLES[0]))
    # arbitrary ids (specials anywhere, invalid UTF-8) -- without SentencePiece byte pieces, whose
    # invalid runs a full decode blanks out retroactively (see IncrementalDecoder)
    allowed = [i for i in range(ours.vocab_size) if i not in ours.byte_fallback_ids]
    for _ in range(100):
        ids = [rng.choice(allowed) for _ in range(rng.randint(1, 25))]
        check_stream(ours, ids, skip=rng.random() < 0.5, text_is_valid=False)


def test_truncated_gguf(synthetic, tmp_path):
    data = synthetic["qwen2"][2].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(SlimlmError, match="truncated or corrupt"):
        Tokenizer.from_gguf_file(tmp_path / "cut.gguf")
