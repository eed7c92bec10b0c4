"""Sampling: pure functions over a batch of logits [B, V], composed by `sample_next_tokens`.

Order (as vLLM and HF transformers do): penalties and bans on the raw logits (repetition,
presence/frequency, no-repeat n-grams, min_tokens), greedy rows take the argmax there; the others go
through temperature, top-k, top-p and min-p and draw one token. A row with a `torch.Generator` draws
only from it, so a seeded request gives the same tokens whatever else shares its batch.

None of these functions changes its input tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from slimlm.engine.params import SamplingParams
from slimlm.engine.sequence import Sequence


# ---- penalties and bans (need token histories: one row at a time) ----
def apply_repetition_penalty(
    logits: torch.Tensor, token_ids_lists: Seq[Seq[int]], penalties: Seq[float]
) -> torch.Tensor:
    """HF semantics: for every token seen (prompt + generated), logit > 0 is divided by the penalty,
    logit < 0 multiplied by it."""
    out = logits.clone()
    for row, (token_ids, penalty) in enumerate(zip(token_ids_lists, penalties, strict=True)):
        if penalty == 1.0 or not token_ids:
            continue
        ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
        seen = out[row, ids]
        out[row, ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


def apply_presence_frequency_penalties(
    logits: torch.Tensor,
    completion_token_ids_lists: Seq[Seq[int]],
    presence_penalties: Seq[float],
    frequency_penalties: Seq[float],
) -> torch.Tensor:
    """OpenAI semantics over generated tokens only: logit -= presence * [count > 0] + frequency * count."""
    out = logits.clone()
    vocab = logits.shape[-1]
    for row, (token_ids, presence, frequency) in enumerate(
        zip(completion_token_ids_lists, presence_penalties, frequency_penalties, strict=True)
    ):
        if (presence == 0 and frequency == 0) or not token_ids:
            continue
        ids = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=vocab)[:vocab].to(out.dtype)
        out[row] -= presence * (counts > 0).to(out.dtype) + frequency * counts
    return out


def banned_ngram_tokens(token_ids: Seq[int], ngram_size: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `token_ids` (HF semantics)."""
    n = ngram_size
    if n <= 0 or len(token_ids) + 1 < n:
        return []
    tail = tuple(token_ids[len(token_ids) - n + 1 :])
    return sorted(
        {
            token_ids[i + n - 1]
            for i in range(len(token_ids) - n + 1)
            if tuple(token_ids[i : i + n - 1]) == tail
        }
    )


def apply_no_repeat_ngram(
    logits: torch.Tensor, token_ids_lists: Seq[Seq[int]], sizes: Seq[int]
) -> torch.Tensor:
    """Ban (-inf) every token that would repeat an n-gram of prompt + generated tokens."""
    out = logits.clone()
    for row, (token_ids, size) in enumerate(zip(token_ids_lists, sizes, strict=True)):
        banned = banned_ngram_tokens(token_ids, size)
        if banned:
            out[row, banned] = float("-inf")
    return out


def apply_min_tokens(
    logits: torch.Tensor,
    num_generated: Seq[int],
    min_tokens: Seq[int],
    stop_token_ids_lists: Seq[Iterable[int]],
) -> torch.Tensor:
    """Ban the stop tokens (eos + stop_token_ids) of rows that have generated fewer than min_tokens."""
    out = logits.clone()
    for row, (n, minimum, stop_ids) in enumerate(
        zip(num_generated, min_tokens, stop_token_ids_lists, strict=True)
    ):
        ids = [t for t in stop_ids if t < logits.shape[-1]]
        if n < minimum and ids:
            out[row, ids] = float("-inf")
    return out


# ---- warpers (vectorized over the batch; one value per row) ----
def _column(values: Seq[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1)


def apply_temperature(logits: torch.Tensor, temperatures: Seq[float] | torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; rows with temperature 0 (greedy) are left unchanged."""
    t = _column(temperatures, logits)
    return logits / torch.where(t > 0, t, torch.ones_like(t))


def apply_top_k(logits: torch.Tensor, top_ks: Seq[int] | torch.Tensor) -> torch.Tensor:
    """Keep each row's k highest logits (ties with the k-th included); k <= 0 or k >= V disables."""
    vocab = logits.shape[-1]
    if not isinstance(top_ks, torch.Tensor):  # k beyond the vocabulary disables, even past int64
        top_ks = [k if k <= vocab else 0 for k in top_ks]
    k = torch.as_tensor(top_ks, dtype=torch.long, device=logits.device)
    k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(-1, (k - 1).reshape(-1, 1))  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_ps: Seq[float] | torch.Tensor) -> torch.Tensor:
    """Nucleus filtering (HF semantics): drop the least likely tokens whose total probability is
    at most 1 - top_p; the most likely token always stays."""
    p = _column(top_ps, logits)
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= 1 - p
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_ps: Seq[float] | torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = _column(min_ps, probs) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


# ---- drawing ----
def sample(
    logits: torch.Tensor,
    params_list: Seq[SamplingParams],
    generators: Seq[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next token of each row from logits that already went through the penalties.

    Greedy rows take the argmax. The others apply temperature, top-k, top-p, min-p and draw by an
    exponential race (argmax p / E, E ~ Exp(1), which samples from p); a row with a generator draws
    its noise only from it, the rest share the default generator.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params_list) if not p.greedy]
    if not rows:
        return tokens
    sub = logits[rows]
    ps = [params_list[i] for i in rows]
    sub = apply_temperature(sub, [p.temperature for p in ps])
    if any(p.top_k > 0 for p in ps):
        sub = apply_top_k(sub, [p.top_k for p in ps])
    if any(p.top_p < 1 for p in ps):
        sub = apply_top_p(sub, [p.top_p for p in ps])
    if any(p.min_p > 0 for p in ps):
        sub = apply_min_p(sub, [p.min_p for p in ps])
    probs = sub.softmax(dim=-1)
    noise = torch.empty_like(probs)
    gens = [generators[i] if generators is not None else None for i in rows]
    shared = [j for j, g in enumerate(gens) if g is None]
    if shared:
        noise[shared] = torch.empty_like(probs[shared]).exponential_()
    for j, g in enumerate(gens):
        if g is not None:
            noise[j].exponential_(generator=g)
    tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens


@dataclass
class TokenLogprobs:
    """Log-probability of the chosen token and the top alternatives (most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def compute_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int | Seq[int]) -> list[TokenLogprobs]:
    """From the raw model logits (before penalties, temperature or filtering), as vLLM reports by
    default: the chosen token's log-probability and each row's top-k (k per row or one for all)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ks = [k] * logits.shape[0] if isinstance(k, int) else list(k)
    chosen_lp = logprobs.gather(-1, chosen.reshape(-1, 1).long()).squeeze(-1).tolist()
    max_k = max(ks, default=0)
    top_vals, top_ids = logprobs.topk(max_k, dim=-1) if max_k > 0 else (None, None)
    out = []
    for row, (token_id, lp, kk) in enumerate(zip(chosen.tolist(), chosen_lp, ks, strict=True)):
        top = list(zip(top_ids[row, :kk].tolist(), top_vals[row, :kk].tolist(), strict=True)) if kk else []
        out.append(TokenLogprobs(int(token_id), lp, top))
    return out


# ---- the sampler the runner calls ----
def apply_penalties(
    logits: torch.Tensor, seqs: Seq[Sequence], eos_token_ids: Iterable[int] = ()
) -> torch.Tensor:
    """Every history-dependent processor, each only when some row of the batch asks for it."""
    params = [s.params for s in seqs]
    if any(p.repetition_penalty != 1.0 for p in params):
        logits = apply_repetition_penalty(
            logits, [s.token_ids for s in seqs], [p.repetition_penalty for p in params]
        )
    if any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params):
        logits = apply_presence_frequency_penalties(
            logits,
            [s.completion_token_ids for s in seqs],
            [p.presence_penalty for p in params],
            [p.frequency_penalty for p in params],
        )
    if any(p.no_repeat_ngram_size > 0 for p in params):
        logits = apply_no_repeat_ngram(
            logits, [s.token_ids for s in seqs], [p.no_repeat_ngram_size for p in params]
        )
    if any(s.num_completion_tokens < s.params.min_tokens for s in seqs):
        eos = list(eos_token_ids)
        logits = apply_min_tokens(
            logits,
            [s.num_completion_tokens for s in seqs],
            [p.min_tokens for p in params],
            [eos + p.stop_token_ids for p in params],
        )
    return logits


def sample_next_tokens(
    logits: torch.Tensor,
    seqs: Seq[Sequence],
    generators: Seq[torch.Generator | None] | None = None,
    eos_token_ids: Iterable[int] = (),
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """One token per sequence from its last-position logits [B, V]; logprobs where requested."""
    raw = logits.float()
    processed = apply_penalties(raw, seqs, eos_token_ids)
    tokens = sample(processed, [s.params for s in seqs], generators)
    logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if wanted:
        computed = compute_logprobs(raw[wanted], tokens[wanted], [seqs[i].params.logprobs for i in wanted])
        for i, entry in zip(wanted, computed, strict=True):
            logprobs[i] = entry
    return tokens.tolist(), logprobs
