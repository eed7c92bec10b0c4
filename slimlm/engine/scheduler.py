"""Scheduler: decides which sequences run in the next step (prefill first, else decode), FCFS.

Prefill steps take waiting sequences in arrival order while they fit `max_num_seqs`,
`max_num_batched_tokens` (counting only tokens not already in the prefix cache) and the free blocks.
A prompt longer than `max_num_batched_tokens` is not chunked: it runs alone in its own step.
Decode steps run every running sequence; when a block is missing, the most recently arrived running
sequence is preempted (blocks freed, put back at the front of the waiting queue, its prompt and
generated tokens recomputed later), so older requests always make progress.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from slimlm.engine.block_manager import BlockManager
from slimlm.engine.sequence import FinishReason, Sequence, SequenceStatus
from slimlm.errors import SlimlmError


@dataclass
class SchedulerOutput:
    """One step's work. For prefill, seq i computes its tokens from `num_cached_tokens` on
    (`num_scheduled_tokens[i]` of them); for decode, its last token."""

    seqs: list[Sequence]
    is_prefill: bool
    num_scheduled_tokens: list[int]
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences the scheduler ended itself this step (alone and still out of KV blocks: "length").
    finished: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)


class Scheduler:
    """Waiting and running queues over one BlockManager."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_model_len: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        for name, value in (
            ("max_model_len", max_model_len),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if value < 1:
                raise SlimlmError(f"{name}={value} is invalid: it must be at least 1")
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest arrival first
        self.num_preemptions = 0

    # ---- queues ----
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises SlimlmError when it can never fit."""
        n = seq.num_tokens
        if n >= self.max_model_len:
            raise SlimlmError(
                f"the prompt has {n} tokens but the model context is {self.max_model_len} tokens "
                f"(room is needed for at least one generated token); shorten the prompt"
            )
        bm = self.block_manager
        needed = bm.blocks_needed(n + 1)  # the prompt and the first generated token
        if needed > bm.num_blocks:
            raise SlimlmError(
                f"the prompt needs {needed} KV blocks ({n} tokens + 1 generated, {bm.block_size} tokens a block) "
                f"but the whole KV cache has {bm.num_blocks} blocks ({bm.num_blocks * bm.block_size} tokens); "
                f"shorten the prompt or give the KV cache more memory"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Cancel a waiting or running sequence, freeing its blocks; returns it (None if unknown)."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    self.finish(seq, "abort")
                    return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence (also used by the engine for stop strings) and free its blocks."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def has_unfinished(self) -> bool:
        return not self.is_finished()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- scheduling ----
    def schedule(self) -> SchedulerOutput:
        """Pick the next step's sequences: a prefill batch when one fits, else a decode batch."""
        prefill = self._schedule_prefill()
        if prefill.seqs:
            return prefill
        return self._schedule_decode()

    def _schedule_prefill(self) -> SchedulerOutput:
        bm = self.block_manager
        seqs: list[Sequence] = []
        num_new: list[int] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if bm.prefix_in_flight(seq):
                break  # its prefix is being computed right now: reuse it next step
            new_tokens = seq.num_tokens - bm.match_prefix(seq)
            if seqs and new_tokens > budget:
                break  # an over-long prompt runs alone (it is the first of its batch)
            if not bm.can_allocate(seq):
                break
            bm.allocate(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(seq.num_tokens - seq.num_cached_tokens)
            budget -= num_new[-1]
            if budget <= 0:
                break
        return SchedulerOutput(seqs, is_prefill=True, num_scheduled_tokens=num_new)

    def _schedule_decode(self) -> SchedulerOutput:
        bm = self.block_manager
        out = SchedulerOutput([], is_prefill=False, num_scheduled_tokens=[])
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            while not bm.can_append(seq):
                victim = self.running[-1]  # most recently arrived
                if victim is seq and i == 0:
                    # Nothing else holds blocks: this sequence alone has filled the KV cache.
                    self.finish(seq, "length")
                    out.finished.append(seq)
                    break
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.may_append(seq)
                out.seqs.append(seq)
                out.num_scheduled_tokens.append(1)
                i += 1
                continue
            # seq left the running list (preempted or finished): index i now points at the next one
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)  # all waiting sequences arrived after it: FCFS holds
        self.num_preemptions += 1

    # ---- after the step ----
    def postprocess(
        self, seqs: list[Sequence], token_ids: list[int], logprobs: list[Any] | None = None
    ) -> list[Sequence]:
        """Record the step's sampled tokens; returns the sequences that finished.

        Stop *strings* are the engine's job (they need detokenized text): it calls `finish`.
        """
        finished = []
        for i, (seq, token_id) in enumerate(zip(seqs, token_ids, strict=True)):
            if seq.is_finished:
                continue  # aborted while the step ran
            self.block_manager.mark_computed(seq)
            seq.append_token(token_id, logprobs[i] if logprobs is not None else None)
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        p = seq.params
        n = seq.num_completion_tokens
        if n >= p.min_tokens:
            if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
                return "stop"
        if n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
