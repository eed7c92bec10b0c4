"""Scheduler: FCFS prefill/decode batches, limits, preemption and resumption, abort, finishing."""

from collections import Counter

import pytest

from slimlm.engine.block_manager import BlockManager
from slimlm.engine.params import SamplingParams
from slimlm.engine.scheduler import Scheduler
from slimlm.engine.sequence import Sequence, SequenceStatus
from slimlm.errors import SlimlmError

BS = 4
EOS = 2


def make(num_blocks=64, **kwargs) -> Scheduler:
    kwargs.setdefault("max_model_len", 1024)
    return Scheduler(BlockManager(num_blocks, BS), eos_token_ids=[EOS], **kwargs)


def seq(n: int, start: int = 10, **params) -> Sequence:
    return Sequence(list(range(start, start + n)), SamplingParams(**params))


def next_token(s: Sequence) -> int:
    """A stand-in model: the next token depends only on the tokens so far (never eos)."""
    return 1000 + s.num_tokens


def check_invariants(sched: Scheduler) -> None:
    holders = Counter(b for s in sched.running for b in s.block_table)
    for block in sched.block_manager.blocks:
        assert block.ref_count == holders.get(block.block_id, 0)
    assert all(not s.block_table for s in sched.waiting)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks - len(holders)


def step(sched: Scheduler, token_fn=next_token):
    out = sched.schedule()
    for s, n in zip(out.seqs, out.num_scheduled_tokens, strict=True):
        assert n == (s.num_tokens - s.num_cached_tokens if out.is_prefill else 1)
        assert len(s.block_table) == s.num_blocks(BS)
    finished = sched.postprocess(out.seqs, [token_fn(s) for s in out.seqs])
    check_invariants(sched)
    return out, finished


def ids(seqs):
    return [s.seq_id for s in seqs]


def test_prefill_first_then_decode_in_arrival_order():
    sched = make()
    a, b, c = seq(5), seq(3, start=100), seq(9, start=200)
    for s in (a, b, c):
        sched.add(s)
    out, _ = step(sched)
    assert out.is_prefill and ids(out.seqs) == ids([a, b, c])
    assert out.num_scheduled_tokens == [5, 3, 9]
    out, _ = step(sched)
    assert not out.is_prefill and ids(out.seqs) == ids([a, b, c])
    d = seq(4, start=500)
    sched.add(d)
    out, _ = step(sched)
    assert out.is_prefill and ids(out.seqs) == ids([d])  # new prompts go before decodes


def test_max_num_seqs_limits_running_sequences():
    sched = make(max_num_seqs=2)
    a, b, c = seq(3, max_tokens=2), seq(3, max_tokens=5), seq(3)
    for s in (a, b, c):
        sched.add(s)
    out, _ = step(sched)
    assert ids(out.seqs) == ids([a, b])
    out, finished = step(sched)  # c cannot start: two are running
    assert not out.is_prefill and ids(finished) == ids([a])
    out, _ = step(sched)
    assert out.is_prefill and ids(out.seqs) == ids([c])


def test_token_budget_counts_only_uncached_tokens():
    sched = make(max_num_batched_tokens=10)
    a, b = seq(8), seq(8, start=100)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert ids(out.seqs) == ids([a])  # 8 + 8 > 10
    out, _ = step(sched)
    assert ids(out.seqs) == ids([b])
    # Two prompts of 12 tokens whose first 8 are cached need 4 new tokens each: both fit.
    c = Sequence(list(range(10, 18)) + [1, 1, 1, 1])
    d = Sequence(list(range(10, 18)) + [3, 3, 3, 3])
    sched.add(c)
    sched.add(d)
    out, _ = step(sched)
    assert ids(out.seqs) == ids([c, d]) and out.num_scheduled_tokens == [4, 4]


def test_a_prompt_longer_than_the_token_budget_runs_alone():
    sched = make(max_num_batched_tokens=4)
    a, b = seq(3), seq(10, start=100)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert ids(out.seqs) == ids([a])
    out, _ = step(sched)
    assert ids(out.seqs) == ids([b]) and out.num_scheduled_tokens == [10]


def test_identical_prompts_added_together_share_the_prefix():
    sched = make()
    a, b = Sequence(list(range(9))), Sequence(list(range(9)))
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert ids(out.seqs) == ids([a])  # b waits one step for a's blocks
    out, _ = step(sched)
    assert ids(out.seqs) == ids([b]) and b.block_table[:2] == a.block_table[:2]
    assert out.num_scheduled_tokens == [1]


def test_preemption_recomputes_the_newest_and_keeps_fcfs():
    # 5 blocks of 4 tokens; three prompts of 3 tokens each grow until the pool runs out.
    sched = make(num_blocks=5)
    seqs = [seq(3, start=10 * i, max_tokens=6) for i in range(1, 4)]
    for s in seqs:
        sched.add(s)
    preempted_order = []
    finished_order = []
    for _ in range(40):
        if sched.is_finished():
            break
        out, finished = step(sched)
        preempted_order += ids(out.preempted)
        finished_order += ids(finished)
        waiting_arrivals = [s.arrival for s in sched.waiting]
        assert waiting_arrivals == sorted(waiting_arrivals)
    assert sched.is_finished() and not sched.has_unfinished()
    assert preempted_order and preempted_order[0] == seqs[2].seq_id  # the newest goes first
    assert finished_order[0] == seqs[0].seq_id  # the oldest is never held back
    for s in seqs:
        # Same tokens as without preemption: the recomputed context gives the same next tokens.
        assert s.completion_token_ids == [1000 + n for n in range(3, 9)]
        assert s.finish_reason == "length"
    assert sched.num_preemptions == len(preempted_order)
    assert sched.block_manager.usage == 0.0


def test_a_resumed_sequence_recomputes_prompt_and_generated_tokens():
    sched = make(num_blocks=2)
    a, b = seq(3, max_tokens=8), seq(3, start=50, max_tokens=8)
    sched.add(a)
    sched.add(b)
    step(sched)  # prefill both: one block each
    step(sched)  # decode: both blocks are now full
    out, _ = step(sched)  # a's 5th token needs a block: b, the newest, gives its one up
    assert ids(out.preempted) == ids([b]) and ids(out.seqs) == ids([a])
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_tokens == 5
    while True:
        out, _ = step(sched)
        if out.is_prefill:
            break
    assert a.is_finished  # a ran alone until it finished; then b comes back
    # b's evicted block is gone from the cache: its 3 prompt + 2 generated tokens are all recomputed.
    assert ids(out.seqs) == ids([b]) and out.num_scheduled_tokens == [5]
    assert b.completion_token_ids == [1003, 1004, 1005]


def test_a_sequence_alone_that_fills_the_cache_finishes_with_length():
    sched = make(num_blocks=2, max_model_len=1024)
    a = seq(3, max_tokens=100)
    sched.add(a)
    reasons = None
    for _ in range(20):
        out, _ = step(sched)
        if out.finished:
            reasons = [s.finish_reason for s in out.finished]
            break
    # Two blocks hold the KV of 8 tokens; the 9th was sampled from them and has nowhere to go.
    assert reasons == ["length"] and a.num_tokens == 9
    assert sched.is_finished() and sched.block_manager.usage == 0.0


def test_abort_frees_blocks_wherever_the_sequence_is():
    sched = make(max_num_seqs=1)
    a, b = seq(9), seq(5, start=100)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.block_manager.usage > 0
    assert sched.abort(a.seq_id) is a
    assert a.finish_reason == "abort" and a.block_table == []
    assert sched.block_manager.usage == 0.0
    assert sched.abort(b.seq_id) is b  # still waiting
    assert sched.abort(12345) is None
    assert sched.is_finished()


def test_finish_conditions():
    sched = make()
    eos = seq(3)
    ignore = seq(3, ignore_eos=True, max_tokens=3)
    early = seq(3, min_tokens=2)
    stop_id = seq(3, stop_token_ids=[77])
    for s in (eos, ignore, early, stop_id):
        sched.add(s)
    out = sched.schedule()
    finished = sched.postprocess(out.seqs, [EOS, EOS, EOS, 77])
    assert ids(finished) == ids([eos, stop_id])
    assert eos.finish_reason == "stop" and eos.completion_token_ids == [EOS]
    out = sched.schedule()
    assert ids(out.seqs) == ids([ignore, early])
    finished = sched.postprocess(out.seqs, [EOS, EOS])
    assert ids(finished) == ids([early])  # min_tokens=2 reached on its second token
    out = sched.schedule()
    finished = sched.postprocess(out.seqs, [5])
    assert ids(finished) == ids([ignore]) and ignore.finish_reason == "length"


def test_max_model_len_ends_generation():
    sched = make(max_model_len=6)
    a = seq(4)
    sched.add(a)
    step(sched)
    _, finished = step(sched)
    assert ids(finished) == ids([a]) and a.finish_reason == "length" and a.num_tokens == 6


def test_finish_for_stop_strings_frees_blocks():
    sched = make()
    a = seq(5)
    sched.add(a)
    step(sched)
    sched.finish(a, "stop")
    assert a.is_finished and sched.is_finished() and sched.block_manager.usage == 0.0


def test_prompts_that_can_never_fit_are_rejected_up_front():
    sched = make(num_blocks=2)
    with pytest.raises(SlimlmError, match=r"needs 3 KV blocks .* 2 blocks"):
        sched.add(seq(8))  # 8 tokens + 1 generated need 3 blocks of 4
    sched.add(seq(7))  # 7 + 1 fit exactly
    with pytest.raises(SlimlmError, match="context is 16 tokens"):
        make(max_model_len=16).add(seq(16))
    with pytest.raises(SlimlmError, match="empty"):
        Sequence([])
    with pytest.raises(SlimlmError, match="max_num_seqs=0"):
        make(max_num_seqs=0)
