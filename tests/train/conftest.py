"""Tiny fixtures for training tests: a random Llama saved as an HF directory with a character tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]


def write_char_tokenizer(out: Path) -> None:
    """A character-level tokenizer (ASCII + newline, < 128 ids) with a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "<|im_end|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def save_tiny_model(out: Path, arch: str = "llama", seed: int = 0) -> Path:
    from tests.tiny_models import make_hf_model

    hf = make_hf_model(arch, seed=seed)
    hf.config.eos_token_id = 2
    hf.config.bos_token_id = None
    hf.save_pretrained(str(out), safe_serialization=True)
    write_char_tokenizer(out)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and the machine is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa_records(n: int = 24) -> list[dict]:
    """Small XTuner-style conversations with a learnable answer (the question reversed)."""
    words = [
        "apple",
        "river",
        "stone",
        "cloud",
        "maple",
        "tiger",
        "pearl",
        "ember",
        "frost",
        "lotus",
        "quill",
        "raven",
    ]
    out = []
    for i in range(n):
        w = words[i % len(words)] + str(i // len(words))
        out.append({"conversation": [{"input": f"reverse {w}", "output": w[::-1]}]})
    return out
