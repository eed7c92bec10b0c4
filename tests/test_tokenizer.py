"""slimlm.tokenizer against transformers (the oracle) on the same files.

Covers the embedded SmolLM2 GGUF, tiny synthetic GGUF vocabularies (Llama-3 and Qwen2 byte-level BPE,
SentencePiece with byte fallback) trained here on pydoc text, HF tokenizer directories, chat templates,
streaming detokenization and bad input.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
regex = pytest.importorskip("regex")  # a transformers dependency; used by the llama.cpp-style oracle

from pydoc_data.topics import topics  # noqa: E402

from tokenizers import Regex, models, pre_tokenizers, trainers  # noqa: E402
from tokenizers import Tokenizer as Backend  # noqa: E402

from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.tokenizer import IncrementalDecoder, Tokenizer, gguf_fields, read_gguf_metadata  # noqa: E402
from slimlm.tokenizer.gguf_vocab import bytes_to_unicode  # noqa: E402
from slimlm.tokenizer.pretokenizers import LLAMA3_SPLIT, QWEN2_SPLIT  # noqa: E402

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


# ------------------------------------------------------------------------- synthetic GGUF vocabularies

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
    pieces = [p for p in train_sentencepiece() if not regex.fullmatch(r"<0x[0-9A-F]{2}>", p)]
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


# ------------------------------------------------------------------------------------------- streaming


def stream(tokenizer: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def check_stream(tokenizer: Tokenizer, ids: list[int], skip: bool, text_is_valid: bool) -> None:
    pieces = stream(tokenizer, ids, skip)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) == full
    if text_is_valid:  # valid UTF-8 text: partial characters are held back, never shown as U+FFFD
        assert not any("\ufffd" in p for p in pieces)


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


def test_truncated_gguf(synthetic, tmp_path):
    data = synthetic["qwen2"][2].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(SlimlmError, match="truncated or corrupt"):
        Tokenizer.from_gguf_file(tmp_path / "cut.gguf")


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
