"""The quantized KV formats' layout, without torch: bits of K and V, channels per scale, bytes.

One table read by the pools (slimlm/kv/quantized.py), the planner (slimlm/plan/inference.py) and the
docs, so that the planner's bytes per token stay the pool's exact figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.errors import SlimlmError

SCALE_ZERO_BYTES = 3  # fp16 scale + uint8 zero point, per group of channels, per token and head


@dataclass(frozen=True)
class KVFormat:
    k_bits: int
    v_bits: int
    k_group: int = 0  # preferred channels per scale of per-token keys (0: one scale for the head)
    v_group: int = 0  # the same for values
    key_channels: bool = False  # KIVI: keys scaled per channel within a block, staged in bf16 until full
    sink_tokens: int = 0  # key_channels: the blocks holding a sequence's first tokens stay in bf16 staging

    def sink_blocks(self, block_size: int) -> int:
        """Leading blocks of every sequence kept exact (attention sinks): those that hold its first
        `sink_tokens` tokens."""
        return -(-self.sink_tokens // block_size) if self.key_channels else 0

    def staging_slots(self, max_seqs: int, block_size: int) -> int:
        """bf16 staging slots of a key_channels pool for `max_seqs` running sequences: each holds its
        sink blocks and at most one unfinished block between steps, and one step may start a new block
        while the previous one is being finished; 0 for pools without staging."""
        if not self.key_channels:
            return 0
        return (2 + self.sink_blocks(block_size)) * max_seqs + 1

    def groups(self, head_dim: int) -> tuple[int, int]:
        """Channels per scale of K and of V at this head_dim (0 = the whole head): the preferred group
        where it divides the head into several even groups. Per-channel keys have no per-token group."""
        k_group = 0 if self.key_channels else effective_group(head_dim, self.k_group)
        return k_group, effective_group(head_dim, self.v_group)

    def block_head_bytes(self, head_dim: int, block_size: int) -> int:
        """K and V of one block of tokens for one KV head: codes plus scales and zero points."""
        if head_dim % 2 and 4 in (self.k_bits, self.v_bits):
            raise SlimlmError(f"int4 KV packs two values a byte and needs an even head_dim, got {head_dim}")
        total = 0
        for which, (bits, group) in enumerate(
            zip((self.k_bits, self.v_bits), self.groups(head_dim), strict=True)
        ):
            total += block_size * head_dim * bits // 8
            if which == 0 and self.key_channels:
                total += SCALE_ZERO_BYTES * head_dim  # one scale and zero per channel per block
            else:
                total += block_size * SCALE_ZERO_BYTES * (head_dim // (group or head_dim))
        return total

    def block_bytes(self, config, block_size: int) -> int:
        """One block over all layers and KV heads, plus the staging pools' 4-byte index per block."""
        per_head = self.block_head_bytes(config.head_dim, block_size)
        return config.num_hidden_layers * config.num_key_value_heads * per_head + (
            4 if self.key_channels else 0
        )

    def bytes_per_token_head(self, head_dim: int, block_size: int = 16) -> float:
        """Average bytes of one token's K and V for one head (a block's bytes / block_size)."""
        return self.block_head_bytes(head_dim, block_size) / block_size


def effective_group(head_dim: int, group: int) -> int:
    """`group` where it splits the head into whole, even-sized groups; else 0 (the whole head)."""
    return group if group and group < head_dim and head_dim % group == 0 and group % 2 == 0 else 0


KV_FORMATS = {
    "int8": KVFormat(8, 8),
    # int4: KIVI keys, both turned; chosen on a tuning text, reported on others
    # (benchmarks/kv_fidelity_sweep.py, docs/kv_cache.md)
    # and the blocks of each sequence's first 32 tokens kept in bf16 (attention sinks, docs/kv_cache.md)
    "int4": KVFormat(4, 4, key_channels=True, sink_tokens=32),
    "k8v4": KVFormat(8, 4),  # values whole-head: 8-bit keys already make it the closest (tuning text)
}
