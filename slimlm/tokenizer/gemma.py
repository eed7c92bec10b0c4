"""Gemma's SentencePiece vocabulary from GGUF metadata, and Gemma 3's chat template.

The structure follows transformers' GGUF `gemma_tokenizer` and `GemmaTokenizer`: spaces become "▁" in a
normalizer (no prefix space, no split), byte fallback, and merges rebuilt from the vocabulary with the
file's token order as the rank (Gemma's scores do not follow its merge order). Tokens made only of
spaces are stored as real spaces and are respelled with "▁" first, so the merges built from them match.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

# Gemma 3's chat template as published with the instruction-tuned models (turns as <start_of_turn>role,
# "assistant" spelled "model", a system message prefixed to the first user turn). GGUF conversions of
# the base models often carry none; serving needs one.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
END_OF_TURN = "<end_of_turn>"


def respell_spaces(tokens: list[str]) -> list[str]:
    return ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]


def _cache_path(tokens: list[str], unk: str | None) -> Path:
    digest = hashlib.sha256("\x00".join([*tokens, str(unk)]).encode("utf-8", "surrogatepass")).hexdigest()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "slimlm" / "tokenizers" / f"gemma-{digest[:24]}.json"


def gemma_backend(fields: Mapping[str, Any], tokens: list[str], unk: str | None) -> Backend:
    """The BPE tokenizer of a Gemma GGUF (`tokens`: already respelled with `respell_spaces`).

    Rebuilding the merges of a 262k vocabulary takes seconds (tens on a busy machine), so the built
    model is kept in ~/.cache/slimlm/tokenizers, keyed by a hash of the vocabulary, and read back next
    time; a cache that cannot be read or written is skipped.
    """
    if "tokenizer.ggml.merges" not in fields:
        cached = _cache_path(tokens, unk)
        try:
            if cached.is_file():
                return Backend.from_file(str(cached))
        except Exception:  # noqa: BLE001 - a damaged cache file: rebuild it
            pass
    backend = _build(fields, tokens, unk)
    if "tokenizer.ggml.merges" not in fields:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            backend.save(str(tmp))
            os.replace(tmp, cached)
        except OSError:
            pass
    return backend


def _build(fields: Mapping[str, Any], tokens: list[str], unk: str | None) -> Backend:
    from slimlm.tokenizer.gguf_vocab import _merge_pairs, _string_list, merges_from_scores

    vocab = {token: index for index, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in fields:
        merges = _merge_pairs(_string_list(fields, "tokenizer.ggml.merges", required=True))
    else:
        merges = merges_from_scores(vocab, {token: -float(i) for i, token in enumerate(tokens)})
    backend = Backend(
        models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    # As GemmaTokenizer; after the normalizer no space is left, so it never splits (kept for parity).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(" "), behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return backend
