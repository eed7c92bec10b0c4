"""CLI tests run on a tiny random Llama saved as an HF directory (loads in well under a second).

Its vocabulary is exactly the character tokenizer's, so every token it can sample decodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_models import BASE
from tests.train.conftest import write_char_tokenizer


def save_tiny_cli_model(out: Path, seed: int = 0) -> Path:
    import transformers

    write_char_tokenizer(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    config = transformers.LlamaConfig(**{**BASE, "vocab_size": vocab, "max_position_embeddings": 256})
    config.eos_token_id, config.bos_token_id = 2, None
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_cli_model(tmp_path_factory.mktemp("tiny-cli-llama"))
