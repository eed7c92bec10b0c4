"""Attention metadata: what one forward step needs to know about the sequences in its flat batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttnMetadata:
    """Describes a flat batch: sequence i owns `query_lens[i]` consecutive tokens of the step.

    context_lens[i] counts the tokens in the cache after this step (new ones included), so the new
    tokens sit at positions context_lens[i] - query_lens[i] ... context_lens[i] - 1.
    """

    query_lens: list[int]
    context_lens: list[int]
    slots: list[int] | None = None  # contiguous cache: row of each sequence
    block_tables: torch.Tensor | None = None  # paged cache: [num_seqs, max_blocks] int64, -1 padded
    slot_mapping: torch.Tensor | None = None  # paged cache: [T] flat slot index of each new token
    # Per-step tensors built once (e.g. the decode mask) and shared by every layer of the step.
    step_cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.query_lens) != len(self.context_lens):
            raise ValueError("query_lens and context_lens must have one entry per sequence")

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @classmethod
    def single(cls, num_new: int, context_len: int, slot: int = 0) -> AttnMetadata:
        return cls(query_lens=[num_new], context_lens=[context_len], slots=[slot])
