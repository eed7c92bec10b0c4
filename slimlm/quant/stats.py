"""Running statistics of a linear layer's inputs: everything AWQ and GPTQ need from calibration data.

Both algorithms only ever look at second moments of the inputs (GPTQ's Hessian is 2·E[x xᵀ]; AWQ's
output error ‖ΔW x‖² averages to tr(ΔW E[x xᵀ] ΔWᵀ)), so the calibration activations never need to be
kept: one [in, in] matrix per distinct input tensor, whatever the number of calibration tokens.
"""

from __future__ import annotations

import torch


class InputStats:
    """Running means of x xᵀ and |x| over all rows x [in] seen so far (float32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.abs_mean = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.count = 0

    @classmethod
    def of(cls, x: torch.Tensor) -> InputStats:
        stats = cls(x.shape[-1], x.device)
        stats.add(x)
        return stats

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [n, in]
        n = x.shape[0]
        total = self.count + n
        # Running means keep the magnitudes (and GPTQ's relative dampening) independent of the count.
        self.gram.mul_(self.count / total).addmm_(x.T, x, alpha=1 / total)
        self.abs_mean.mul_(self.count / total).add_(x.abs().sum(dim=0), alpha=1 / total)
        self.count = total

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2/n · Σ x xᵀ."""
        return 2 * self.gram

    def divide_inputs(self, scale: torch.Tensor) -> None:
        """Update in place to the statistics of x / scale (after AWQ folds `scale` into the producer)."""
        s = scale.float()
        self.gram.div_(s.unsqueeze(0) * s.unsqueeze(1))
        self.abs_mean.div_(s)
