"""Beam search for one request, as pure logic over log-probabilities; the engine drives it step by step.

Follows HF transformers' `_beam_search` (v4.50+) exactly, float32 arithmetic included:
- each step keeps the top K = max(2, 1 + #eos) * num_beams continuations over all running beams;
- a continuation that ends on eos, or reaches max_tokens, is finished; only those among the first
  num_beams of the K count, scored sum(log-probs) / generated_len ** length_penalty (generated_len
  counts the new tokens, eos included, not the prompt);
- the best num_beams unfinished continuations keep running;
- the search ends when no running beam can beat the worst kept finished one (early_stopping=False
  estimates the best score at the current length, "never" at max_tokens when length_penalty > 0),
  when num_beams hypotheses are finished and early_stopping is True, or at max_tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from slimlm.engine.params import SamplingParams

_NEG = -1.0e9  # HF's stand-in for "impossible"


@dataclass
class BeamHypothesis:
    token_ids: list[int]  # generated tokens (the eos included when the beam ended on one)
    score: float  # sum of log-probs / len(token_ids) ** length_penalty


class BeamSearch:
    """State of one request's beam search.

    `beams` holds the generated tokens of the running beams (one empty beam at the start). Each step,
    give `step` the log-probs of those beams' next token ([len(beams), V], after log_softmax and any
    logits processors, as HF applies them); it returns (parent beam index, token) for each new beam.
    """

    def __init__(
        self,
        num_beams: int,
        max_tokens: int,
        eos_token_ids: Iterable[int] = (),
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
    ) -> None:
        self.num_beams = num_beams
        self.max_tokens = max_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.beams: list[list[int]] = [[]]
        self.num_generated = 0
        self.done = False
        self._keep = max(2, 1 + len(self.eos_token_ids)) * num_beams
        self._running_scores = torch.zeros(1)
        self._finished_tokens: list[list[int]] = [[] for _ in range(num_beams)]
        self._finished_scores = torch.full((num_beams,), _NEG)
        self._finished_flags = torch.zeros(num_beams, dtype=torch.bool)
        self._improvable = True

    @classmethod
    def from_params(cls, params: SamplingParams, eos_token_ids: Iterable[int] = ()) -> BeamSearch:
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        return cls(
            params.num_beams, params.max_tokens, stop_ids, params.length_penalty, params.early_stopping
        )

    def step(self, log_probs: torch.Tensor) -> list[tuple[int, int]]:
        """Advance every running beam by one token; returns (parent index, token) of the new beams,
        or [] once the search is done (then read `results()`)."""
        if self.done:
            raise RuntimeError("beam search already finished")
        num_rows, vocab = log_probs.shape
        if num_rows != len(self.beams):
            raise ValueError(f"expected log-probs for {len(self.beams)} beams, got {num_rows}")
        scores = (log_probs.detach().float().cpu() + self._running_scores[:, None]).reshape(-1)
        k = min(self._keep, scores.numel())
        top_scores, top_idx = torch.topk(scores, k)
        parents = (top_idx // vocab).tolist()
        tokens = (top_idx % vocab).tolist()
        length = self.num_generated + 1
        hits = torch.tensor([t in self.eos_token_ids or length >= self.max_tokens for t in tokens])
        candidates = [self.beams[p] + [t] for p, t in zip(parents, tokens, strict=True)]

        # Running beams: the best continuations that did not just finish.
        running = top_scores + hits.to(torch.float32) * _NEG
        keep = torch.topk(running, min(self.num_beams, k)).indices
        self.beams = [candidates[j] for j in keep.tolist()]
        self._running_scores = running[keep]

        self._update_finished(top_scores, candidates, hits, length)
        self.num_generated = length
        self._update_done(hits)
        if self.done:
            return []
        return [(parents[j], tokens[j]) for j in keep.tolist()]

    def _update_finished(
        self, top_scores: torch.Tensor, candidates: list[list[int]], hits: torch.Tensor, length: int
    ) -> None:
        k = top_scores.numel()
        just_finished = hits & (torch.arange(k) < self.num_beams)
        scores = top_scores / (length**self.length_penalty)
        full = bool(self._finished_flags.all()) and self.early_stopping is True
        scores += torch.tensor(full).to(torch.float32) * _NEG
        scores += torch.tensor(not self._improvable).to(torch.float32) * _NEG
        scores += (~just_finished) * _NEG
        merged_scores = torch.cat((self._finished_scores, scores))
        merged_flags = torch.cat((self._finished_flags, just_finished))
        merged_tokens = self._finished_tokens + candidates
        best = torch.topk(merged_scores, self.num_beams).indices
        self._finished_scores = merged_scores[best]
        self._finished_flags = merged_flags[best]
        self._finished_tokens = [merged_tokens[j] for j in best.tolist()]

    def _update_done(self, hits: torch.Tensor) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_tokens
        else:
            best_length = self.num_generated
        best_running = self._running_scores[:1] / (best_length**self.length_penalty)
        worst_finished = torch.where(self._finished_flags, self._finished_scores.min(), torch.tensor(_NEG))
        self._improvable = self._improvable and bool((best_running > worst_finished).any())
        all_full = bool(self._finished_flags.all()) and self.early_stopping is True
        self.done = not self._improvable or all_full or bool(hits.all())

    def results(self) -> list[BeamHypothesis]:
        """Finished hypotheses, best first (up to num_beams)."""
        return [
            BeamHypothesis(list(tokens), float(score))
            for tokens, score, flag in zip(
                self._finished_tokens,
                self._finished_scores.tolist(),
                self._finished_flags.tolist(),
                strict=True,
            )
            if flag
        ]
