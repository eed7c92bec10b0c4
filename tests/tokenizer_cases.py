"""Shared inputs for the tokenizer tests: text samples, conversations, tiny GGUF vocabularies trained
here on pydoc text (Llama-3 / Qwen2 byte-level BPE, SentencePiece with byte fallback), parity checks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from pydoc_data.topics import topics

import gguf
from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from slimlm.tokenizer import IncrementalDecoder, Tokenizer
from slimlm.tokenizer.pretokenizers import LLAMA3_SPLIT, QWEN2_SPLIT

UNICODE_SAMPLES = [
    "naïve café, déjà vu — “quoted” … ¿qué? ¡sí!",
    "e\u0301 vs é, a\u0308 vs ä, n\u0303, Å vs A\u030a (combining marks)",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "Ελληνικά и русский текст, עברית, العربية",
    "math ∑∫√∞ ≤ ≥ ≠ x² ½ Ⅻ ①",
    "tabs\tand\u00a0nbsp\u2003em\u200bzero-width",
    "   leading",
    "trailing   ",
    "\n\n\n",
    "a  \n  b\r\n c",
    "   \t  \n",
    "digits 0 12 345 6789 3.14159 1,000,000 1e-10 2024-01-31",
    "x  1 y\n 2 z\t\t3   42",
    "0x1F 0b1010 ١٢٣ ۴۵",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|>",
    "<|im_start|><|im_end|>",
    "<|im_start <im_end|> |im_end|>",
    "",
    " ",
    "'s 're 've 'll 'd 'm 't I'M WON'T",
    "http://example.com/a?b=c&d=e#f",
    "def f(x):\n    return x**2  # comment\n",
]


def corpus_paragraphs(step: int = 9) -> list[str]:
    paragraphs = [p for text in topics.values() for p in text.split("\n\n") if p.strip()]
    return paragraphs[::step]  # a few hundred, spread over the whole corpus


SAMPLES = corpus_paragraphs() + UNICODE_SAMPLES


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, with ünïcödé 😀?"},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "  spaces  \n\n and newlines "},
        {"role": "assistant", "content": "Sure.", "name": None},
        {"role": "user", "content": "<|im_end|> is not special inside content"},
        {"role": "assistant", "content": "Understood."},
    ],
]


def assert_same_as_transformers(ours: Tokenizer, hf, texts: list[str], conversations=CONVERSATIONS) -> None:
    for text in texts:
        for add_special in (True, False):
            assert ours.encode(text, add_special_tokens=add_special) == hf.encode(
                text, add_special_tokens=add_special
            )
        ids = hf.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    if hf.chat_template is not None:
        for conversation in conversations:
            for agp in (True, False):
                expected = hf.apply_chat_template(conversation, add_generation_prompt=agp, tokenize=False)
                assert ours.apply_chat_template(conversation, add_generation_prompt=agp) == expected


def stream(tokenizer: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def check_stream(tokenizer: Tokenizer, ids: list[int], skip: bool, text_is_valid: bool) -> None:
    pieces = stream(tokenizer, ids, skip)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) == full
    if text_is_valid:  # valid UTF-8 text: partial characters are held back, never shown as U+FFFD
        assert not any("\ufffd" in p for p in pieces)


TRAIN_TEXTS = list(topics.values())[:30] + UNICODE_SAMPLES * 10
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles') }}"
    "{% endif %}{% endfor %}"
)


def train_byte_level(split: str, size: int = 700) -> tuple[list[str], list[str]]:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(
        TRAIN_TEXTS, trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet, show_progress=False)
    )
    model = json.loads(backend.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return sorted(model["vocab"], key=model["vocab"].get), merges


def train_sentencepiece(size: int = 700) -> list[str]:
    backend = Backend(models.BPE(byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.train_from_iterator(TRAIN_TEXTS, trainers.BpeTrainer(vocab_size=size, show_progress=False))
    vocab = json.loads(backend.to_str())["model"]["vocab"]
    return sorted(vocab, key=vocab.get)


def write_gguf(path: Path, fields: dict) -> Path:
    writer = gguf.GGUFWriter(
        str(path), arch="llama"
    )  # transformers reads a model config before the tokenizer
    for key, value in {
        "block_count": 1,
        "context_length": 64,
        "embedding_length": 8,
        "feed_forward_length": 16,
        "attention.head_count": 2,
        "attention.head_count_kv": 1,
        "rope.dimension_count": 4,
    }.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def byte_level_fields(
    split: str, pre: str, specials: list[str], template: str, bos: str, eos: str, add_bos: bool
):
    tokens, merges = train_byte_level(split)
    tokens = tokens + specials + ["<|tool|>"]
    types = [1] * (len(tokens) - len(specials) - 1) + [3] * len(specials) + [4]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index(bos),
        "tokenizer.ggml.eos_token_id": tokens.index(eos),
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.chat_template": template,
    }


def sentencepiece_fields():
    pieces = [p for p in train_sentencepiece() if not re.fullmatch(r"<0x[0-9A-F]{2}>", p)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|tool|>"]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4],
        "tokenizer.ggml.scores": [0.0] * 259 + [float(-i) for i in range(len(pieces))] + [0.0],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.chat_template": MISTRAL_TEMPLATE,
    }


SYNTHETIC = {
    "llama3": lambda: byte_level_fields(
        LLAMA3_SPLIT,
        "llama-bpe",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        LLAMA3_TEMPLATE,
        "<|begin_of_text|>",
        "<|eot_id|>",
        add_bos=True,
    ),
    "qwen2": lambda: byte_level_fields(
        QWEN2_SPLIT,
        "qwen2",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        CHATML_TEMPLATE,
        "<|endoftext|>",
        "<|im_end|>",
        add_bos=False,
    ),
    "sentencepiece": sentencepiece_fields,
}
# characters the synthetic vocabularies never saw: SentencePiece spells them with byte pieces
UNSEEN_SAMPLES = ["𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ ★ 🦀 ꙮ ∰", "x🦀y 𝔘 z", "🦀🦀🦀", "ꙮ"]
SYNTHETIC_TEXTS = (
    SAMPLES[::3]
    + UNSEEN_SAMPLES
    + [
        "<|begin_of_text|>hi<|eot_id|> <|tool|>x",
        "<s>[INST] hi [/INST]</s>",
        "<|im_start|>a<|im_end|>",
    ]
)
