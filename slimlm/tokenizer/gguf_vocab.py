"""Rebuild a `tokenizers` tokenizer from GGUF metadata: vocabulary, merges, token types, special ids.

Two vocabulary kinds are supported, named by `tokenizer.ggml.model`:
  gpt2   byte-level BPE (SmolLM, Llama-3, Qwen2, ...), split as `tokenizer.ggml.pre` says
  llama  SentencePiece-style BPE with byte fallback (Llama-2, Mistral), merges rebuilt from scores;
         Gemma's variant (its own normalizer and merge order) in slimlm/tokenizer/gemma.py
The structure (which tokens are special, the spelling of the vocabulary, merges from scores, the
SentencePiece decoder) follows transformers' GGUF converter; the text split follows llama.cpp.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from numbers import Integral
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from slimlm.errors import SlimlmError
from slimlm.tokenizer.pretokenizers import PRE_TOKENIZERS

# llama.cpp's token types (tokenizer.ggml.token_type)
CONTROL = 3
USER_DEFINED = 4

SUPPORTED_MODELS = ("gpt2 (byte-level BPE)", "llama (SentencePiece BPE)")
_SPECIAL_ID_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
_END_ID_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# SentencePiece vocabularies whose files need fixes we do not implement (transformers has builders for them)
_UNSUPPORTED_SPM_ARCHS = ("phi3",)
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")  # slimlm/tokenizer/gemma.py


@dataclass
class GgufTokenizerParts:
    backend: Backend
    special_tokens: dict[str, str]  # bos_token/eos_token/unk_token/pad_token -> token text
    chat_template: str | dict[str, str] | None
    eos_token_ids: list[int]


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_from_gguf(fields: Mapping[str, Any]) -> GgufTokenizerParts:
    """The tokenizer a GGUF file's `tokenizer.*` metadata describes."""
    kind = fields.get("tokenizer.ggml.model")
    tokens = _string_list(fields, "tokenizer.ggml.tokens", required=True)
    token_types = _int_list(fields, "tokenizer.ggml.token_type", len(tokens))
    pre = fields.get("tokenizer.ggml.pre") or "default"
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    if kind == "gpt2":
        if pre not in PRE_TOKENIZERS:
            raise SlimlmError(
                f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        backend = _byte_level(fields, tokens, pre)
        default_add_bos = PRE_TOKENIZERS[pre].add_bos
    elif kind == "llama" and fields.get("general.architecture") in _GEMMA_ARCHS:
        from slimlm.tokenizer.gemma import gemma_backend, respell_spaces

        tokens = respell_spaces(tokens)
        unk_id = _token_id(fields, "tokenizer.ggml.unknown_token_id", tokens)
        backend = gemma_backend(fields, tokens, tokens[unk_id] if unk_id is not None else None)
        default_add_bos = True
    elif kind == "llama":
        arch = fields.get("general.architecture")
        if arch in _UNSUPPORTED_SPM_ARCHS:
            raise SlimlmError(f"GGUF SentencePiece vocabularies of {arch!r} models are not supported yet")
        backend = _sentencepiece(fields, tokens)
        default_add_bos = True  # SentencePiece Llama models always start with <s>
    else:
        raise SlimlmError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: {', '.join(SUPPORTED_MODELS)}"
        )

    _add_typed_tokens(backend, tokens, token_types, byte_level=kind == "gpt2")
    special = {
        name: tokens[i]
        for name, key in _SPECIAL_ID_KEYS.items()
        if (i := _token_id(fields, key, tokens)) is not None
    }
    add_missing_special_tokens(backend, special.values())
    backend.post_processor = bos_eos_processor(
        backend,
        special.get("bos_token"),
        special.get("eos_token"),
        add_bos=bool(default_add_bos if add_bos is None else add_bos),
        add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
    )
    end_ids = [i for key in _END_ID_KEYS if (i := _token_id(fields, key, tokens)) is not None]
    template = _chat_template(fields)
    if fields.get("general.architecture") == "gemma3":
        from slimlm.tokenizer.gemma import END_OF_TURN, GEMMA3_CHAT_TEMPLATE

        template = template or GEMMA3_CHAT_TEMPLATE  # base-model conversions carry none
        if END_OF_TURN in tokens:  # chat turns end with it (llama.cpp and HF stop there too)
            end_ids.append(tokens.index(END_OF_TURN))
    return GgufTokenizerParts(backend, special, template, list(dict.fromkeys(end_ids)))


def _byte_level(fields: Mapping[str, Any], tokens: list[str], pre: str) -> Backend:
    spec = PRE_TOKENIZERS[pre]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A few converters store added tokens as raw text; the BPE model needs them in the byte alphabet.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = _merge_pairs(_string_list(fields, "tokenizer.ggml.merges", required=True))
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=spec.ignore_merges,
        )
    )
    backend.pre_tokenizer = spec.build()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(fields: Mapping[str, Any], tokens: list[str]) -> Backend:
    vocab = {token: index for index, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in fields:
        merges = _merge_pairs(_string_list(fields, "tokenizer.ggml.merges", required=True))
    else:
        scores = fields.get("tokenizer.ggml.scores")
        if not isinstance(scores, Sequence) or len(scores) != len(tokens):
            raise SlimlmError(
                "GGUF SentencePiece vocabulary has neither merges nor one score per token; re-convert it"
            )
        merges = merges_from_scores(vocab, dict(zip(tokens, map(float, scores), strict=True)))
    unk_id = _token_id(fields, "tokenizer.ggml.unknown_token_id", tokens)
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges: every split of a token into two vocabulary pieces, best score first.

    Same order as transformers' `generate_merges` (ties: shorter left piece, then shorter right piece,
    then vocabulary order), so both rebuild identical tokenizers from the same file.
    """
    merges = []
    for token, score in scores.items():
        local = [
            (token[:cut], token[cut:], score)
            for cut in range(1, len(token))
            if token[:cut] in vocab and token[cut:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_typed_tokens(
    backend: Backend, tokens: list[str], token_types: list[int] | None, byte_level: bool
) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so each
    is matched whole in the text. A control token spelled outside the byte alphabet of a byte-level
    vocabulary is a converter mislabel and is skipped (as transformers does)."""
    if not token_types:
        return
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind == CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind == USER_DEFINED and token in vocab
    ]
    backend.add_tokens(user)


def add_missing_special_tokens(backend: Backend, names: Any) -> None:
    """Named special tokens (bos/eos/...) that are not added tokens yet become special added tokens,
    as transformers' TokenizersBackend does when it is constructed."""
    present = {str(token.content) for token in backend.get_added_tokens_decoder().values()}
    missing = [name for name in dict.fromkeys(names) if name and name not in present]
    backend.add_special_tokens([AddedToken(name, normalized=False, special=True) for name in missing])


def bos_eos_processor(backend: Backend, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool):
    """transformers' `update_post_processor`: BOS/EOS around every encoded sequence when asked."""
    add_bos = add_bos and bos is not None
    add_eos = add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = [(bos, backend.token_to_id(bos))] if add_bos else []
    special += [(eos, backend.token_to_id(eos))] if add_eos else []
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _chat_template(fields: Mapping[str, Any]) -> str | dict[str, str] | None:
    default = fields.get("tokenizer.chat_template")
    names = fields.get("tokenizer.chat_templates") or []
    named = {
        n: fields[f"tokenizer.chat_template.{n}"] for n in names if f"tokenizer.chat_template.{n}" in fields
    }
    if not named:
        return default
    return {**named, "default": default} if default else named


def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    pairs = [tuple(merge.split(" ")) for merge in merges]
    bad = next((m for m, p in zip(merges, pairs, strict=True) if len(p) != 2), None)
    if bad is not None:
        raise SlimlmError(f"GGUF merge {bad!r} is not two tokens separated by one space; the file is corrupt")
    return pairs  # type: ignore[return-value]


def _token_id(fields: Mapping[str, Any], key: str, tokens: list[str]) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, Integral) or not 0 <= value < len(tokens):
        raise SlimlmError(
            f"GGUF metadata {key}={value!r} is not a token id below {len(tokens)}; the file is corrupt"
        )
    return int(value)


def _string_list(fields: Mapping[str, Any], key: str, required: bool = False) -> list[str]:
    value = fields.get(key)
    if value is None and not required:
        return []
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not all(isinstance(v, str) for v in value)
    ):
        raise SlimlmError(
            f"GGUF metadata {key!r} is missing or not a list of strings; the file has no usable tokenizer"
        )
    return list(value)


def _int_list(fields: Mapping[str, Any], key: str, length: int) -> list[int] | None:
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, Sequence) or len(value) != length:
        raise SlimlmError(
            f"GGUF metadata {key!r} should list one entry per token ({length}); the file is corrupt"
        )
    return [int(v) for v in value]
