"""`Tokenizer`: HF `tokenizers` (Rust) for text <-> ids, Jinja for chat templates; no transformers at run time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from slimlm.errors import SlimlmError
from slimlm.tokenizer.chat_template import render_chat


class Tokenizer:
    """Text <-> token ids plus the model's chat template.

    Build it with `Tokenizer.from_hf_dir(path)` or `Tokenizer.from_gguf(fields)`. Encoding, decoding
    and chat rendering give the same results as transformers' tokenizer for the same files, except
    where a GGUF names a pre-tokenizer transformers does not reproduce (see `pretokenizers.py`).
    """

    def __init__(
        self,
        backend: Backend,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}
        self.chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        eos = self._named_id("eos_token")
        self._eos_token_ids = list(eos_token_ids) if eos_token_ids else ([eos] if eos is not None else [])
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._byte_ids: frozenset[int] | None = None

    # construction ---------------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From an HF model/tokenizer directory: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
        from slimlm.tokenizer.hf_dir import load_hf_dir

        parts = load_hf_dir(path)
        return cls(parts.backend, parts.special_tokens, parts.chat_template, parts.eos_token_ids)

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """From GGUF metadata as a plain dict (see `gguf_fields`): `tokenizer.ggml.*` and `tokenizer.chat_template`."""
        from slimlm.tokenizer.gguf_vocab import build_from_gguf

        if not isinstance(fields, Mapping):
            raise SlimlmError(
                "Tokenizer.from_gguf takes a dict of GGUF metadata; build one with gguf_fields(reader)"
            )
        parts = build_from_gguf(fields)
        return cls(parts.backend, parts.special_tokens, parts.chat_template, parts.eos_token_ids)

    @classmethod
    def from_gguf_file(cls, path: str | Path) -> Tokenizer:
        """From a .gguf file (reads only its metadata)."""
        from slimlm.tokenizer.gguf_metadata import read_gguf_metadata

        return cls.from_gguf(read_gguf_metadata(path))

    # ids ------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a reply (GGUF: eos, eot and eom ids; HF dir: the eos token)."""
        return list(self._eos_token_ids)

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._named_id("unk_token")

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops."""
        return self._special_ids

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of SentencePiece byte pieces (<0x00>..<0xFF>) that the decoder joins into characters; empty
        for byte-level vocabularies."""
        if self._byte_ids is None:
            uses = getattr(self.backend.model, "byte_fallback", False)
            # 256 lookups, not get_vocab(): that builds a dict of the whole vocabulary (seconds at 262k)
            ids = (self.backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if uses else ()
            self._byte_ids = frozenset(i for i in ids if i is not None)
        return self._byte_ids

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._id_to_token(self._check_ids([ids])[0])
        return [self._id_to_token(i) for i in self._check_ids(ids)]

    # text -----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With add_special_tokens, BOS/EOS are added only if the tokenizer's files say so."""
        if not isinstance(text, str):
            raise SlimlmError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def batch_encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise SlimlmError("batch_encode takes a list of str; use encode for a single string")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # chat -----------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the model's chat template, exactly as transformers does.

        Returns the prompt string, or its token ids with `tokenize=True` (encoded without adding
        BOS/EOS, since templates write those themselves). `chat_template` picks a named template or
        passes a template string; extra kwargs become template variables (e.g. enable_thinking=False).
        """
        template = self._pick_template(chat_template, tools)
        text = render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            tools=tools,
            documents=documents,
            continue_final_message=continue_final_message,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _pick_template(self, name_or_template: str | None, tools: list[dict] | None) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if name_or_template in templates:
                return templates[name_or_template]
            if name_or_template is not None:
                return name_or_template
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise SlimlmError(
                f"the model has several chat templates and none is the default; pick one of {sorted(templates)}"
            )
        if name_or_template is not None:
            return name_or_template
        if not templates:
            raise SlimlmError(
                "this model has no chat template; pass chat_template='...' or send plain prompts instead of messages"
            )
        return templates

    # helpers --------------------------------------------------------------------------------------

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return self.backend.token_to_id(token) if token else None

    def _id_to_token(self, index: int) -> str:
        token = self.backend.id_to_token(index)
        if token is None:
            raise SlimlmError(f"token id {index} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise SlimlmError("expected token ids (a list of int), got a string")
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise SlimlmError("expected token ids (a list of int)") from None
        size = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < size), None)
        if bad is not None:
            raise SlimlmError(f"token id {bad} is outside the vocabulary (0..{size - 1})")
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids})"
