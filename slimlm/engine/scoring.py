"""Prompt scoring: the log-probability of every prompt token given the tokens before it.

This is what OpenAI's legacy `echo: true, logprobs: k` returns and what evaluation harnesses sum for
loglikelihood (multiple-choice) tasks. It runs one causal forward over the prompt without the paged KV
cache (the cache holds keys and values, not the per-position logits this needs), and turns the
hidden states into logits a chunk of positions at a time, so a long prompt never holds a
[prompt, vocab] float tensor whole.
"""

from __future__ import annotations

import torch

from slimlm.engine.sampling import TokenLogprobs
from slimlm.errors import SlimlmError

_LOGITS_ROWS = 256  # positions turned into logits at once (256 x 49k vocab x 4 B = 50 MB for SmolLM2)


@torch.inference_mode()
def prompt_logprobs(model, token_ids: list[int], top: int = 0) -> list[TokenLogprobs | None]:
    """-> one entry per prompt token: None for the first (nothing precedes it), then the token's
    log-probability under the model and the `top` most likely tokens at that position (raw logits,
    no sampling settings: the same numbers `compute_logprobs` reports for generated tokens)."""
    from slimlm.kv.dense import DenseAttention
    from slimlm.kv.metadata import AttnMetadata

    if not token_ids:
        raise SlimlmError("cannot score an empty prompt")
    if top < 0:
        raise SlimlmError(f"top must be >= 0, got {top}")
    out: list[TokenLogprobs | None] = [None]
    n = len(token_ids)
    if n == 1:
        return out
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    meta = AttnMetadata(query_lens=[n], context_lens=[n])
    positions = torch.arange(n, device=device)
    hidden = model.forward(ids, positions, DenseAttention(model.config), meta)
    # position p's logits predict token p + 1
    for start in range(0, n - 1, _LOGITS_ROWS):
        end = min(start + _LOGITS_ROWS, n - 1)
        logprobs = torch.log_softmax(model.compute_logits(hidden[start:end]).float(), dim=-1)
        targets = ids[start + 1 : end + 1]
        chosen = logprobs.gather(-1, targets.reshape(-1, 1)).squeeze(-1).tolist()
        if top:
            top_vals, top_ids = logprobs.topk(top, dim=-1)
            tops = [
                list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_vals.tolist(), strict=True)
            ]
        else:
            tops = [[] for _ in chosen]
        for token, lp, alternatives in zip(targets.tolist(), chosen, tops, strict=True):
            out.append(TokenLogprobs(int(token), lp, alternatives))
    return out
