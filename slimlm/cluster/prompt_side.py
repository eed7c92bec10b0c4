"""What the ingress needs of a model without its weights: tokenizer, chat template, config, limits.

The ingress tokenizes requests itself (so the router can see token prefixes) and builds the OpenAI
responses; it duck-types the few attributes of `slimlm.engine.llm.LLM` the server reads, loading only the
tokenizer and config (GGUF metadata or config.json), never the weights.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from slimlm.errors import SlimlmError


class PromptSide:
    """`llm.tokenizer`, `llm.config`, `llm.loaded.generation_config`, `llm.engine.max_model_len` and the
    prompt methods of LLM, over a tokenizer and a config."""

    def __init__(self, tokenizer, config, generation_config: dict, max_model_len: int, source: str) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.loaded = SimpleNamespace(generation_config=generation_config, source=source)
        # kv_pool_tokens: no pool here; each replica holds at most a full context (one is checked by
        # the replica's own engine), so the ingress bounds a request by the context alone
        self.engine = SimpleNamespace(
            max_model_len=max_model_len,
            eos_token_ids=list(config.eos_token_ids or []),
            kv_pool_tokens=max_model_len,
        )

    def encode_prompt(self, prompt):
        from slimlm.engine.llm import LLM

        return LLM.encode_prompt(self, prompt)  # uses only self.tokenizer and self.config

    def chat_prompt(self, messages, tools=None):
        from slimlm.engine.llm import LLM

        return LLM.chat_prompt(self, messages, tools=tools)


def load_prompt_side(model: str | None, max_model_len: int | None) -> PromptSide:
    """Tokenizer and config of `model` (as `slimlm.loading.load` would give them), without weights."""
    from slimlm.config import ModelConfig
    from slimlm.loading.default_model import resolve_model_path
    from slimlm.tokenizer import Tokenizer

    path = resolve_model_path(model)
    if path.is_file():
        from slimlm.loading.gguf_file import GGUFFile, config_and_tokenizer

        if path.suffix.lower() != ".gguf":
            raise SlimlmError(f"{path} is not a .gguf file; pass a GGUF file or an HF model directory")
        with GGUFFile(path) as file:
            config, tokenizer = config_and_tokenizer(file)
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids}
    elif path.is_dir() and (path / "config.json").is_file():
        from slimlm.loading.safetensors_dir import read_generation_config

        config = ModelConfig.from_json_file(path / "config.json")
        tokenizer = Tokenizer.from_hf_dir(Path(path))
        gen = read_generation_config(path)
        eos = gen.get("eos_token_id")
        if eos is not None:
            config.eos_token_ids = list(
                dict.fromkeys(config.eos_token_ids + ([eos] if isinstance(eos, int) else list(eos)))
            )
    else:
        raise SlimlmError(f"{path} is not a model: expected an HF directory with config.json or a .gguf file")
    return PromptSide(tokenizer, config, gen, max_model_len or config.max_position_embeddings, str(path))
