"""Sequence: one request's tokens and its bookkeeping (plain Python, no tensors)."""

from __future__ import annotations

import enum
import itertools
from typing import Any, Literal

from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# "stop": eos, a stop token or a stop string; "length": max_tokens, max_model_len, or the KV cache
# cannot hold the sequence; "abort": cancelled by the caller.
FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort")


class Sequence:
    """Prompt + generated tokens of one request, with where its KV cache lives.

    `num_cached_tokens` counts the leading tokens whose KV is already in the cache (reused from the
    prefix cache or computed by earlier steps); the runner computes tokens from there on.
    `block_hashes` memoizes the content hash of each full block (the block manager fills it).
    """

    def __init__(
        self, token_ids: list[int], params: SamplingParams | None = None, seq_id: int | None = None
    ) -> None:
        if len(token_ids) == 0:
            raise SlimlmError("the prompt is empty: give at least one token")
        self.arrival = next(_arrival_counter)  # FCFS order; kept across preemption
        self.seq_id = self.arrival if seq_id is None else seq_id
        self.params = params if params is not None else SamplingParams()
        self.token_ids: list[int] = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.block_hashes: list[bytes] = []
        self.output_logprobs: list[Any] = []  # one entry per generated token when logprobs are asked

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"completion={self.num_completion_tokens}, cached={self.num_cached_tokens})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        """Blocks needed to hold the KV of all current tokens."""
        return -(-self.num_tokens // block_size)

    def num_full_blocks(self, block_size: int) -> int:
        return self.num_tokens // block_size

    def last_block_num_tokens(self, block_size: int) -> int:
        """Tokens in the last block (block_size when it is full)."""
        return self.num_tokens - (self.num_blocks(block_size) - 1) * block_size

    def block_token_ids(self, index: int, block_size: int) -> list[int]:
        return self.token_ids[index * block_size : (index + 1) * block_size]

    def append_token(self, token_id: int, logprob: Any = None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
