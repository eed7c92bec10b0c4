"""Prefix-affinity request routing for the engine replicas (a Ray Serve `RequestRouter`).

Modelled on Ray LLM's `PrefixCacheAffinityRouter`, with two differences that fit slimlm: the prefix is
matched on *token blocks* (the ingress hashes the prompt's token ids block by block, chained, exactly the
granularity at which a replica's prefix cache can reuse KV), and the table lives in the router itself
rather than in a shared actor, so routing costs no remote call (one ingress replica routes everything).

For each request: the replica that was sent the longest run of this prompt's leading blocks wins, unless
it already has `imbalance` more requests in flight than the least-loaded candidate; with no match (or
that imbalance) the request goes to the least-loaded replica (Ray probes the queue lengths). Each routed
prompt's block hashes are remembered for its replica (least recently used forgotten past `max_blocks`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


@dataclass
class ReplicaJob:
    """What the ingress sends a replica: the prompts with their params and the first prompt's block hashes."""

    requests: list  # [(prompt token ids, SamplingParams)]
    prefix_hashes: list[int]


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `token_ids`: equal lists of hashes mean equal token prefixes."""
    out, previous = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(token_ids[start : start + block_size])))
        out.append(previous)
    return out


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 4, max_blocks: int = 200_000) -> None:
        self._imbalance = imbalance
        self._max_blocks = max_blocks
        self._seen: dict[ReplicaID, OrderedDict[int, None]] = {}

    # -- choosing --------------------------------------------------------------------------------------

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        hashes = _hashes_of(pending_request)
        best, best_len = None, 0
        for replica in candidate_replicas:
            length = self._match_length(replica.replica_id, hashes)
            if length > best_len:
                best, best_len = replica, length
        if best is None:
            return [candidate_replicas]  # least loaded of all (Ray compares their queue lengths)
        loads = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas}
        known = [n for n in loads.values() if n is not None]
        mine = loads[best.replica_id]
        if mine is not None and known and mine - min(known) > self._imbalance:
            return [candidate_replicas]
        others = [r for r in candidate_replicas if r is not best]
        return [[best], others] if others else [[best]]

    def _match_length(self, replica_id: ReplicaID, hashes: list[int]) -> int:
        seen = self._seen.get(replica_id)
        if not seen:
            return 0
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    # -- bookkeeping -----------------------------------------------------------------------------------

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        hashes = _hashes_of(pending_request)
        if not hashes:
            return
        seen = self._seen.setdefault(replica_id, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self._max_blocks:
            seen.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._seen.pop(replica_id, None)  # its replacement starts with an empty cache

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for replica_id in list(self._seen):
            if replica_id not in live:
                del self._seen[replica_id]


def _hashes_of(pending_request: PendingRequest | None) -> list[int]:
    if pending_request is None:
        return []
    for arg in pending_request.args or ():
        if isinstance(arg, ReplicaJob):
            return arg.prefix_hashes
    return []
