"""Read an HF tokenizer directory the way transformers (v5) does.

tokenizer.json is the tokenizer (its post-processor decides BOS/EOS; transformers ignores
`add_bos_token` in tokenizer_config.json when tokenizer.json exists). tokenizer_config.json adds the
named special tokens, extra added tokens and the chat template; chat_template.jinja and
additional_chat_templates/*.jinja take priority over the config's template; special_tokens_map.json
is read only for old directories whose config has no `added_tokens_decoder`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from slimlm.errors import SlimlmError
from slimlm.tokenizer.gguf_vocab import add_missing_special_tokens

SPECIAL_TOKEN_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass
class HfTokenizerParts:
    backend: Backend
    special_tokens: dict[str, str]  # bos_token/eos_token/... (and model-specific *_token) -> token text
    chat_template: str | dict[str, str] | None
    eos_token_ids: list[int]


def load_hf_dir(path: str | Path) -> HfTokenizerParts:
    path = Path(path)
    if not path.is_dir():
        raise SlimlmError(f"{path} is not a directory; pass an HF model or tokenizer directory")
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SlimlmError(
            f"{path} has no tokenizer.json; slimlm reads the fast-tokenizer format only "
            "(write one with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
        )
    try:
        backend = Backend.from_file(str(tokenizer_file))
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise SlimlmError(f"{tokenizer_file} is not a valid tokenizers file ({e}); re-download it") from None

    config = _read_json(path / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:
        config.update(_read_json(path / "special_tokens_map.json"))
    if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
        config["extra_special_tokens"] = config.pop("additional_special_tokens")

    named = {}
    for key, value in config.items():
        if key in SPECIAL_TOKEN_ATTRIBUTES or key.endswith("_token"):
            text = _token_text(value)
            if text is not None:
                named[key] = text
    extra = config.get("extra_special_tokens") or []
    if isinstance(extra, Mapping):  # model-specific names, e.g. {"image_token": "<image>"}
        named.update({k: t for k, v in extra.items() if (t := _token_text(v)) is not None})
        extra = []
    extra_texts = [t for v in extra if (t := _token_text(v)) is not None]

    _add_config_tokens(backend, config.get("added_tokens_decoder") or {})
    add_missing_special_tokens(backend, [*named.values(), *extra_texts])
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

    eos = named.get("eos_token")
    eos_id = backend.token_to_id(eos) if eos else None
    return HfTokenizerParts(
        backend, named, _chat_template(path, config), [eos_id] if eos_id is not None else []
    )


def _add_config_tokens(backend: Backend, added_tokens_decoder: Mapping[str, Any]) -> None:
    """Tokens listed in tokenizer_config.json's added_tokens_decoder but missing from tokenizer.json."""
    present = {str(t.content) for t in backend.get_added_tokens_decoder().values()}
    entries = sorted(((int(i), e) for i, e in added_tokens_decoder.items()), key=lambda item: item[0])
    for _, entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
            raise SlimlmError(
                "tokenizer_config.json: added_tokens_decoder entries must be dicts with a 'content' string"
            )
        if entry["content"] in present:
            continue
        token = AddedToken(entry["content"], **{k: bool(entry[k]) for k in _ADDED_TOKEN_FLAGS if k in entry})
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])


def _chat_template(path: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    templates = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, list):  # older format: [{"name": ..., "template": ...}, ...]
        return {item["name"]: item["template"] for item in template}
    return template


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimlmError(f"{file} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise SlimlmError(f"{file} should hold a JSON object; re-download it")
    return data
