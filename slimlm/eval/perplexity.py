"""Perplexity over a text: non-overlapping windows by default (context = stride), as the AWQ/GPTQ papers do.

With stride < context, windows overlap and only the last `stride` tokens of each window are scored, so
every scored token sees at least `context - stride` tokens of history (HF's "sliding window" recipe).

`max_tokens` counts scored tokens: the text is cut to `max_tokens + 1` ids (the last one is only a
target), so 16,384 with 512-token windows scores 32 full windows.

With a `kv_dtype`, each window runs through a fresh paged KV pool of that format, as the engine's
prefill does: every token attends over the K/V the pool stored, so a quantized pool's cost shows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError
from slimlm.progress import progress_bar


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    context: int
    stride: int


def check_windows(num_ids: int, context: int, stride: int | None) -> int:
    stride = stride or context
    if context < 2 or not 0 < stride <= context:
        raise SlimlmError(
            f"need context >= 2 and 0 < stride <= context, got context={context}, stride={stride}"
        )
    if num_ids < context + 1:
        raise SlimlmError(f"the eval text has {num_ids} tokens; it needs more than the context ({context})")
    return stride


def scored_count(num_ids: int, context: int, stride: int | None) -> int:
    """How many tokens `scored_windows` scores over `num_ids` ids (after any max_tokens cut)."""
    stride = check_windows(num_ids, context, stride)
    windows = len(range(0, num_ids - context, stride))
    return context + (windows - 1) * stride


def window_logits(model, window: torch.Tensor, kv_dtype: str | None = None, block_size: int = 16):
    """Logits [len, vocab] of one window: dense attention, or through a fresh paged pool of `kv_dtype`."""
    if kv_dtype in (None, "auto"):  # the dense path: what a float pool of the model's dtype computes
        return model.forward_dense(window[None, :])[0]
    from slimlm.kv import make_kv_cache
    from slimlm.kv.metadata import AttnMetadata

    n = window.shape[0]
    num_blocks = -(-n // block_size)
    dtype = next(model.parameters()).dtype
    cache = make_kv_cache(model.config, num_blocks, block_size, kv_dtype, dtype, window.device)
    cache.prepare_blocks(range(num_blocks))
    positions = torch.arange(n, device=window.device)
    meta = AttnMetadata(
        [n], [n], block_tables=torch.arange(num_blocks, device=window.device)[None, :], slot_mapping=positions
    )
    return model.compute_logits(model(window, positions, cache, meta))


@torch.inference_mode()
def scored_windows(
    model,
    token_ids: list[int],
    context: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    kv_dtype: str | None = None,
    label: str = "perplexity",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (logits [n, vocab], targets [n]) for the scored positions of each window, in order."""
    if max_tokens:
        token_ids = token_ids[: max_tokens + 1]
    stride = check_windows(len(token_ids), context, stride)
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, device=device)
    starts = list(range(0, len(token_ids) - context, stride))
    with progress_bar(label, total=len(starts), enabled=progress) as advance:
        for i, start in enumerate(starts):
            window = ids[start : start + context + 1]
            logits = window_logits(model, window[:-1], kv_dtype)  # [context, vocab]
            # The first window scores every token; later ones only the tokens new since the last window.
            first = 0 if i == 0 else context - stride
            yield logits[first:], window[1:][first:]
            advance()


def perplexity(
    model,
    token_ids: list[int],
    context: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    kv_dtype: str | None = None,
) -> PerplexityResult:
    total_nll, scored = 0.0, 0
    for logits, targets in scored_windows(model, token_ids, context, stride, max_tokens, progress, kv_dtype):
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        total_nll += float(nll)
        scored += len(targets)
    mean = total_nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, context, stride or context)
