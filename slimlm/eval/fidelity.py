"""How far a variant's next-token distributions are from a reference's, as llama.cpp's
`perplexity --kl-divergence` reports it: mean and 99th-percentile KL(reference || variant) per scored
token, top-1 agreement, and both perplexities over the same tokens.
"""

from __future__ import annotations

import math

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[T, vocab] logits -> float32 log-probabilities."""
    return torch.log_softmax(logits.float(), dim=-1)


class FidelityStats:
    """Accumulates, window by window, the variant's fidelity to the reference over the same tokens."""

    def __init__(self) -> None:
        self.kl: list[torch.Tensor] = []
        self.ref_nll = 0.0
        self.nll = 0.0
        self.agree = 0
        self.tokens = 0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.add_logprobs(log_probs(ref_logits), logits, targets)

    def add_logprobs(self, ref_lp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """ref_lp: [T, vocab] reference log-probs (any float dtype); logits: the variant's [T, vocab]."""
        ref_lp = ref_lp.float()
        lp = log_probs(logits)
        self.kl.append((ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp(min=0))  # rounding can dip below 0
        tgt = targets[:, None]
        self.ref_nll -= float(ref_lp.gather(1, tgt).sum())
        self.nll -= float(lp.gather(1, tgt).sum())
        self.agree += int((ref_lp.argmax(-1) == lp.argmax(-1)).sum())
        self.tokens += len(targets)

    def summary(self) -> dict:
        kl = torch.cat(self.kl) if self.kl else torch.zeros(1)
        ref_ppl, ppl = math.exp(self.ref_nll / self.tokens), math.exp(self.nll / self.tokens)
        return {
            "tokens": self.tokens,
            "ref_ppl": ref_ppl,
            "ppl": ppl,
            "delta_ppl_pct": 100 * (ppl / ref_ppl - 1),
            "kl_mean": float(kl.mean()),
            "kl_p99": float(torch.quantile(kl.double(), 0.99)),
            "top1_agree": self.agree / self.tokens,
        }


def summary_line(r: dict) -> str:
    """One progress line of a FidelityStats.summary() for the fidelity benchmarks."""
    return f"dppl {r['delta_ppl_pct']:+7.3f}%  KL {r['kl_mean']:.4f} p99 {r['kl_p99']:.4f}  top1 {r['top1_agree']:.4f}"
