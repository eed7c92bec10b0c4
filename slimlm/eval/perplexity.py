"""Perplexity over a text: non-overlapping windows by default (context = stride), as the AWQ/GPTQ papers do.

With stride < context, windows overlap and only the last `stride` tokens of each window are scored, so
every scored token sees at least `context - stride` tokens of history (HF's "sliding window" recipe).
"""

from __future__ import annotations

import math
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


@torch.inference_mode()
def perplexity(
    model,
    token_ids: list[int],
    context: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    stride = stride or context
    if context < 2 or not 0 < stride <= context:
        raise SlimlmError(
            f"need context >= 2 and 0 < stride <= context, got context={context}, stride={stride}"
        )
    if max_tokens:
        token_ids = token_ids[:max_tokens]
    if len(token_ids) < context + 1:
        raise SlimlmError(
            f"the eval text has {len(token_ids)} tokens; it needs more than the context ({context})"
        )
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, device=device)
    total_nll, scored = 0.0, 0
    starts = list(range(0, len(token_ids) - context, stride))
    with progress_bar("perplexity", total=len(starts), enabled=progress) as advance:
        for i, start in enumerate(starts):
            window = ids[start : start + context + 1]
            logits = model.forward_dense(window[None, :-1])[0]  # [context, vocab]
            targets = window[1:]
            # The first window scores every token; later ones only the tokens new since the last window.
            first = 0 if i == 0 else context - stride
            nll = torch.nn.functional.cross_entropy(logits[first:].float(), targets[first:], reduction="sum")
            total_nll += float(nll)
            scored += len(targets) - first
            advance()
    mean = total_nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, context, stride)
