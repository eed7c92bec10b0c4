"""Whether `slimlm quantize` quantizes the token embedding and lm_head: one rule for the quantizer and the
planner (torch-free, so `slimlm plan` stays light).

auto quantizes them at 4 bits (what takes w4 under a third of bf16) and keeps them float at 8 bits, where
the table costs little memory but measurable perplexity (SmolLM2-135M w8: +0.55% vs +0.22% decoder only).
"""

from __future__ import annotations

from slimlm.errors import SlimlmError

EMBEDDING_MODES = ("auto", "quantize", "float")


def quantize_embeddings_for(mode: str | bool | None, bits: int) -> bool:
    """Resolve an --embeddings mode (or an explicit bool; None = auto) for `bits`-bit weights."""
    if isinstance(mode, bool):
        return mode
    mode = "auto" if mode is None else mode
    if mode not in EMBEDDING_MODES:
        raise SlimlmError(f"unknown embeddings mode {mode!r}: use one of {', '.join(EMBEDDING_MODES)}")
    return bits == 4 if mode == "auto" else mode == "quantize"
