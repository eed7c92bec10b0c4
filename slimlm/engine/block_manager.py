"""BlockManager: hands out KV cache blocks to sequences and shares full blocks through a prefix cache.

A full block is identified by a hash chain: hash(parent block's hash, the block's token ids), so equal
hashes mean equal prefixes. A block enters the prefix cache only once its KV has been computed
(`mark_computed`, after the step that wrote it), so a failed or aborted step never leaves garbage
behind a hash. Blocks nobody references stay cached and are evicted least-recently-used first, only
when no never-used block is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from slimlm.engine.sequence import Sequence
from slimlm.errors import SlimlmError


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Content hash of a full block chained on its parent's hash (128-bit BLAKE2b)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else b"root")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while the block is registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # kept with the hash to guard against collisions
    computed: bool = False  # False between allocation and the end of the step that writes it


class BlockManager:
    """Allocates fixed-size KV blocks; optionally reuses full blocks across requests (prefix caching)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise SlimlmError(
                f"the KV cache needs at least one block of at least one token "
                f"(got num_blocks={num_blocks}, block_size={block_size}); raise the KV cache budget"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._never_used: deque[int] = deque(range(num_blocks))  # free and holding no cached content
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, oldest release first
        self._hash_to_block: dict[bytes, int] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of those, tokens whose KV was reused
        self.on_release = None  # called with a block id freed uncached (the int4 pool frees its staging)

    # ---- accounting ----
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take (cached blocks nobody references count as free)."""
        return len(self._never_used) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix matching ----
    def _full_block_hashes(self, seq: Sequence, num_full: int) -> list[bytes]:
        """Hashes of the first `num_full` full blocks, memoized on the sequence (tokens only grow)."""
        hashes = seq.block_hashes
        while len(hashes) < num_full:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if i else None, seq.block_token_ids(i, self.block_size)))
        return hashes

    def _lookup(self, seq: Sequence, index: int, block_hash: bytes) -> Block | None:
        block_id = self._hash_to_block.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids != tuple(seq.block_token_ids(index, self.block_size)):
            return None  # hash collision: different content behind the same hash
        return block

    def _matched_blocks(self, seq: Sequence) -> list[Block]:
        """Computed cached blocks equal to the sequence's leading full blocks.

        The last token is never covered: it must run through the model to produce logits.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        matched = []
        for i, block_hash in enumerate(self._full_block_hashes(seq, max_blocks)):
            block = self._lookup(seq, i, block_hash)
            if block is None or not block.computed:
                break
            matched.append(block)
        return matched

    def match_prefix(self, seq: Sequence) -> int:
        """Tokens whose KV `allocate(seq)` would reuse right now (no side effects)."""
        return len(self._matched_blocks(seq)) * self.block_size

    def prefix_in_flight(self, seq: Sequence) -> bool:
        """True when the block after the reusable prefix is being computed in the current step.

        The scheduler then waits a step, so identical prompts admitted together share blocks
        instead of each computing its own copy.
        """
        if not self.enable_prefix_caching:
            return False
        n = len(self._matched_blocks(seq))
        if n >= (seq.num_tokens - 1) // self.block_size:
            return False
        block = self._lookup(seq, n, self._full_block_hashes(seq, n + 1)[n])
        return block is not None and not block.computed

    # ---- allocation ----
    def can_allocate(self, seq: Sequence) -> bool:
        matched = self._matched_blocks(seq)
        revived = sum(1 for b in matched if b.ref_count == 0)  # reusing these takes them off the free pool
        fresh = seq.num_blocks(self.block_size) - len(matched)
        return fresh + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give the sequence blocks for all its tokens, reusing cached full blocks of its prefix."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(
                f"not enough free KV blocks for sequence {seq.seq_id}; check can_allocate first"
            )
        matched = self._matched_blocks(seq)
        for block in matched:
            if block.ref_count == 0:
                del self._evictable[block.block_id]
            block.ref_count += 1
        seq.block_table = [b.block_id for b in matched]
        seq.num_cached_tokens = len(matched) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_cached_tokens
        num_full = seq.num_full_blocks(self.block_size)
        for i in range(len(matched), seq.num_blocks(self.block_size)):
            block = self._take_free_block()
            seq.block_table.append(block.block_id)
            if i < num_full:
                # Announce the content now (still uncomputed) so prefix_in_flight can see it.
                self._register(
                    block, self._full_block_hashes(seq, i + 1)[i], seq.block_token_ids(i, self.block_size)
                )

    def can_append(self, seq: Sequence) -> bool:
        """True when the sequence's newest token has a slot or a free block can provide one."""
        return len(seq.block_table) >= seq.num_blocks(self.block_size) or self.num_free_blocks >= 1

    def may_append(self, seq: Sequence) -> None:
        """Before a decode step: add a block when the newest token starts a new one."""
        if len(seq.block_table) < seq.num_blocks(self.block_size):
            seq.block_table.append(self._take_free_block().block_id)

    def mark_computed(self, seq: Sequence) -> None:
        """After a step ran the sequence: all its current tokens now have KV; cache its new full blocks."""
        first = seq.num_cached_tokens // self.block_size
        seq.num_cached_tokens = seq.num_tokens
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_full_blocks(self.block_size)
        hashes = self._full_block_hashes(seq, num_full)
        for i in range(first, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                self._register(block, hashes[i], seq.block_token_ids(i, self.block_size))
            if block.hash == hashes[i]:
                block.computed = True

    def deallocate(self, seq: Sequence) -> None:
        """Release the sequence's blocks; computed full ones stay cached until evicted."""
        # Release the tail first so LRU eviction drops the ends of chains before their shared roots.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.hash is not None and block.computed:
                self._evictable[block_id] = None
            else:
                self._unregister(block)
                self._never_used.append(block_id)
                if self.on_release is not None:
                    self.on_release(block_id)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def forget_cached(self, block_id: int) -> bool:
        """Drop one cached block nobody references (the int4 pool takes back a sink block's staging
        slot); False when the block is in use or not cached."""
        if block_id not in self._evictable:
            return False
        del self._evictable[block_id]
        self._unregister(self.blocks[block_id])
        self._never_used.append(block_id)
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached block nobody references (e.g. before a cold-start benchmark)."""
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._unregister(self.blocks[block_id])
            self._never_used.append(block_id)

    # ---- internals ----
    def _take_free_block(self) -> Block:
        if self._never_used:
            block = self.blocks[self._never_used.popleft()]
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)  # least recently released
            block = self.blocks[block_id]
            self._unregister(block)
        else:
            raise RuntimeError("no free KV block left; check can_allocate / can_append first")
        block.ref_count = 1
        return block

    def _register(self, block: Block, block_hash: bytes, token_ids: list[int]) -> None:
        if block_hash in self._hash_to_block:
            return  # another block already holds (or will hold) this content
        self._hash_to_block[block_hash] = block.block_id
        block.hash = block_hash
        block.token_ids = tuple(token_ids)
        block.computed = False

    def _unregister(self, block: Block) -> None:
        if block.hash is not None and self._hash_to_block.get(block.hash) == block.block_id:
            del self._hash_to_block[block.hash]
        block.hash = None
        block.token_ids = ()
        block.computed = False
