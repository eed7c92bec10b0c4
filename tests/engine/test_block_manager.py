"""BlockManager: allocation, reference counts, prefix caching, LRU eviction (no tensors)."""

import pytest

from slimlm.engine import block_manager as bm_module
from slimlm.engine.block_manager import BlockManager
from slimlm.engine.sequence import Sequence
from slimlm.errors import SlimlmError

BS = 4


def prefill(bm: BlockManager, tokens: list[int]) -> Sequence:
    """Allocate a sequence and pretend the step that computes its KV ran."""
    seq = Sequence(tokens)
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    bm.mark_computed(seq)
    return seq


def test_allocate_gives_distinct_blocks_and_deallocate_frees_them():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = prefill(bm, list(range(10)))  # 3 blocks
    b = prefill(bm, list(range(100, 105)))  # 2 blocks
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert len(set(a.block_table) | set(b.block_table)) == 5
    assert bm.num_free_blocks == 3
    assert bm.usage == pytest.approx(5 / 8)
    bm.deallocate(a)
    bm.deallocate(b)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert a.block_table == [] and a.num_cached_tokens == 0
    assert all(block.ref_count == 0 for block in bm.blocks)


def test_prefix_blocks_are_shared_with_reference_counts():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = prefill(bm, list(range(9)))  # blocks [0..3] [4..7] [8]
    b = Sequence(list(range(8)) + [50, 51, 52])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 9 + 11
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]


def test_a_different_first_block_breaks_the_chain():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefill(bm, list(range(9)))
    seq = Sequence([99, 1, 2, 3] + list(range(4, 9)))  # same second block, different parent
    assert bm.match_prefix(seq) == 0


def test_the_last_token_is_always_recomputed():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefill(bm, list(range(8)))
    same = Sequence(list(range(8)))  # two full blocks, both cached
    bm.allocate(same)
    assert same.num_cached_tokens == 4  # the second block is recomputed to get logits of token 7


def test_blocks_enter_the_cache_only_once_computed():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = Sequence(list(range(9)))
    bm.allocate(a)
    b = Sequence(list(range(9)))
    assert bm.match_prefix(b) == 0
    assert bm.prefix_in_flight(b)  # the scheduler waits a step instead of computing a copy
    bm.mark_computed(a)
    assert not bm.prefix_in_flight(b)
    assert bm.match_prefix(b) == 8


def test_aborted_uncomputed_blocks_leave_the_cache():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = Sequence(list(range(9)))
    bm.allocate(a)
    bm.deallocate(a)  # e.g. the step failed: its KV was never written
    b = Sequence(list(range(9)))
    assert not bm.prefix_in_flight(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_released_blocks_stay_cached_and_are_reused():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = prefill(bm, list(range(9)))
    first_two = a.block_table[:2]
    bm.deallocate(a)
    assert bm.num_free_blocks == 4
    b = Sequence(list(range(8)) + [7])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == first_two and b.num_cached_tokens == 8
    assert bm.num_free_blocks == 1


def test_decode_appends_blocks_at_boundaries_and_caches_filled_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS)
    seq = prefill(bm, [1, 2, 3])
    generated = [4, 5, 6, 7, 8]
    for token in generated:
        seq.append_token(token)
        assert bm.can_append(seq)
        bm.may_append(seq)
        assert len(seq.block_table) == seq.num_blocks(BS)
        bm.mark_computed(seq)  # the decode step ran
    assert seq.num_tokens == 8 and len(seq.block_table) == 2
    # The block filled during decode ([5, 6, 7, 8]) is cached too.
    later = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.match_prefix(later) == 8


def test_can_append_only_needs_a_block_at_a_boundary():
    bm = BlockManager(num_blocks=1, block_size=BS)
    seq = prefill(bm, [1, 2])
    seq.append_token(3)
    assert bm.can_append(seq)  # slot left in the block
    bm.may_append(seq)
    bm.mark_computed(seq)
    seq.append_token(4)
    bm.may_append(seq)
    bm.mark_computed(seq)
    seq.append_token(5)
    assert not bm.can_append(seq)  # needs a second block, the pool has one


def test_lru_eviction_takes_the_least_recently_released_first():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = prefill(bm, [1] * 4 + [2] * 4 + [0])  # 2 full blocks + 1
    b = prefill(bm, [3] * 4 + [4] * 4 + [0])
    bm.deallocate(a)
    bm.deallocate(b)
    # Re-using a's prefix makes it more recent than b's.
    assert bm.match_prefix(Sequence([1] * 4 + [2] * 4 + [9])) == 8
    again = prefill(bm, [1] * 4 + [2] * 4 + [9])
    bm.deallocate(again)
    # 2 fresh blocks needed beyond the 2 never-cached ones: b's tail block goes first, then b's root.
    fresh = prefill(bm, list(range(100, 115)))  # 4 blocks
    assert len(fresh.block_table) == 4
    bm.deallocate(fresh)
    assert bm.match_prefix(Sequence([3] * 4 + [4] * 4 + [0])) == 0
    assert bm.match_prefix(Sequence([1] * 4 + [2] * 4 + [0])) == 8


def test_eviction_drops_the_tail_of_a_chain_before_its_root():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = prefill(bm, [1] * 4 + [2] * 4 + [3] * 4 + [0])  # 3 full blocks + 1 = all 4 blocks
    bm.deallocate(a)
    # A 2-block sequence takes the never-cached block and evicts one cached block: a's last, not its root.
    prefill(bm, [7] * 5)
    assert bm.match_prefix(Sequence([1] * 4 + [2] * 4 + [3] * 4 + [0])) == 8


def test_hash_collision_does_not_reuse_a_different_block(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, token_ids: b"same")
    bm = BlockManager(num_blocks=8, block_size=BS)
    prefill(bm, [1, 2, 3, 4, 5])
    other = Sequence([9, 9, 9, 9, 5])
    assert bm.match_prefix(other) == 0
    bm.allocate(other)
    assert other.num_cached_tokens == 0
    same = Sequence([1, 2, 3, 4, 6])
    assert bm.match_prefix(same) == 4


def test_can_allocate_counts_revived_cached_blocks():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = prefill(bm, [1] * 4 + [2] * 4 + [0])
    bm.deallocate(a)  # 2 cached blocks + 1 never-cached block, all free
    holder = prefill(bm, [5])  # takes the never-cached block
    # Reusing the 2 cached blocks takes them off the free pool; a third block is needed for the tail.
    assert not bm.can_allocate(Sequence([1] * 4 + [2] * 4 + [0]))
    bm.deallocate(holder)
    assert bm.can_allocate(Sequence([1] * 4 + [2] * 4 + [0]))


def test_prefix_caching_can_be_disabled():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prefill(bm, list(range(9)))
    b = Sequence(list(range(9)))
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and bm.prefix_cache_queries == 0


def test_reset_prefix_cache_forgets_unreferenced_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    bm.deallocate(prefill(bm, list(range(9))))
    bm.reset_prefix_cache()
    assert bm.match_prefix(Sequence(list(range(9)))) == 0
    assert bm.num_free_blocks == 8


def test_bad_sizes_raise():
    with pytest.raises(SlimlmError, match="num_blocks=0"):
        BlockManager(num_blocks=0, block_size=16)
