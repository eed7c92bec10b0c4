"""How byte-level BPE vocabularies in GGUF files split text before merging, keyed by `tokenizer.ggml.pre`.

A GGUF stores the vocabulary and merges but not the pre-tokenizer, only its name. llama.cpp is the
reference runtime for these files, so the splits and flags follow its `llama-vocab.cpp`, written as
the `tokenizers` pre-tokenizers of the models' own tokenizer.json. Where transformers' GGUF converter
differs (it drops SmolLM's one-digit split and Llama-3's `ignore_merges`), we follow llama.cpp, which
matches the tokenizer the model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """One llama.cpp pre-tokenizer type. `split=None` means GPT-2's own regex (built into ByteLevel)."""

    split: str | None = None
    individual_digits: bool = False  # llama.cpp's "\p{N}" pass before the GPT-2 regex
    ignore_merges: bool = False  # a word that is itself in the vocabulary is one token
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token key

    def build(self) -> pre_tokenizers.PreTokenizer:
        if self.split is not None:
            return pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(self.split), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if self.individual_digits:
            return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        return byte_level


_GPT2 = PreTokenizerSpec()
_STARCODER = PreTokenizerSpec(individual_digits=True)
_LLAMA3 = PreTokenizerSpec(LLAMA3_SPLIT, ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizerSpec(QWEN2_SPLIT)

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    # "default" is what converters write for a tokenizer they did not recognise; like transformers we
    # read it as GPT-2 (llama.cpp uses an ad-hoc punctuation/digit split there).
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    "exaone4": _GPT2,
    "smollm": _STARCODER,
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "command-r": _STARCODER,
    "codeshell": _STARCODER,
    "exaone": _STARCODER,
    "minerva-7b": _STARCODER,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "falcon-h1": _LLAMA3,
    "pixtral": _LLAMA3,
    "lfm2": _LLAMA3,
    "dbrx": PreTokenizerSpec(LLAMA3_SPLIT),
    "smaug-bpe": PreTokenizerSpec(LLAMA3_SPLIT),
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "stablelm2": _QWEN2,
    "megrez": _QWEN2,
    "qwen35": PreTokenizerSpec(QWEN35_SPLIT),
    "tekken": PreTokenizerSpec(TEKKEN_SPLIT, ignore_merges=True, add_bos=True),
    "gpt-4o": PreTokenizerSpec(GPT4O_SPLIT),
    "llama4": PreTokenizerSpec(GPT4O_SPLIT),
}
