"""Per-request random generators around the pure sampling functions."""

from __future__ import annotations

import torch

from slimlm.engine.sampling import TokenLogprobs, sample_next_tokens
from slimlm.engine.sequence import Sequence


class Sampler:
    """A seeded request draws only from its own generator, so its tokens do not depend on the batch."""

    def __init__(self, device: torch.device, eos_token_ids: list[int]) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.generators: dict[int, torch.Generator] = {}

    def register(self, seq: Sequence) -> None:
        if seq.params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.params.seed)
            self.generators[seq.seq_id] = gen

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        gens = [self.generators.get(s.seq_id) for s in seqs]
        return sample_next_tokens(logits, seqs, gens, self.eos_token_ids)
