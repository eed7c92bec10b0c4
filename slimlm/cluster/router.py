"""Prefix-affinity request routing for the engine replicas (a Ray Serve `RequestRouter`).

Modelled on Ray LLM's `PrefixCacheAffinityRouter`, with two differences that fit slimlm: the prefix is
matched on *token blocks* (the ingress hashes the prompt's token ids block by block, chained, exactly the
granularity at which a replica's prefix cache can reuse KV), and the table lives in the router itself
rather than in a shared actor, so routing costs no remote call (one ingress replica routes everything).
The table is kept by the ingress (`RemoteEngine`), filled with the replica that actually accepted each
prompt (Ray calls `on_request_routed` only in its strict-max-ongoing-requests mode, and a retried request
may land elsewhere than first chosen); the ingress looks the request up and sends its preferred replica
along in the `ReplicaJob`, so the router itself holds no state that would have to be shared.

What counts as "the same conversation": a request whose prompt *continues an earlier routed prompt*
(the earlier prompt's last full block is one of this prompt's leading blocks, as a chat's next turn
repeats the whole history). Matching any shared leading block instead would send every conversation
that starts with the same system prompt to one replica; that shared part is cached on every replica
after its first use anyway. The table holds, per served prompt, the hash of its last full block and the
replica (least recently used forgotten past `max_prompts`). A request goes to the replica of the
longest earlier prompt it continues, unless that replica already has `imbalance` more requests in flight
than the least-loaded candidate; otherwise (or without a match) to the least-loaded replica (Ray probes
the queue lengths of the candidates and takes the shortest).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


@dataclass
class ReplicaJob:
    """What the ingress sends a replica: the prompts with their params and the first prompt's block hashes."""

    requests: list  # [(prompt token ids, SamplingParams)]
    prefix_hashes: list[int]
    preferred: str | None = None  # unique id of the replica that served the prompt this one continues


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `token_ids`: equal lists of hashes mean equal token prefixes."""
    out, previous = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(token_ids[start : start + block_size])))
        out.append(previous)
    return out


class AffinityTable:
    """Hash of a served prompt's last full block -> the replica (unique id) that served it, LRU-bounded."""

    def __init__(self, max_prompts: int = 100_000) -> None:
        self.max_prompts = max_prompts
        self._ends: OrderedDict[int, str] = OrderedDict()

    def remember(self, hashes: list[int], replica: str) -> None:
        if hashes:
            self._ends[hashes[-1]] = replica
            self._ends.move_to_end(hashes[-1])
            while len(self._ends) > self.max_prompts:
                self._ends.popitem(last=False)

    def lookup(self, hashes: list[int], replicas: set[str]) -> str | None:
        """The replica among `replicas` that served the longest earlier prompt these hashes continue."""
        for h in reversed(hashes):
            replica = self._ends.get(h)
            if replica in replicas:
                return replica
        return None

    def forget(self, replicas: set[str]) -> None:
        if replicas:
            for h in [h for h, r in self._ends.items() if r in replicas]:
                del self._ends[h]

    def replicas(self) -> set[str]:
        return set(self._ends.values())


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 4, patience: int = 4) -> None:
        self._imbalance = imbalance
        self._patience = patience
        self._tries: dict[object, int] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        chosen = _preferred(pending_request)
        if chosen not in by_id:  # a new conversation, or its replica is gone
            return [_shuffled(candidate_replicas)]  # least loaded of all (Ray compares their queue lengths)
        best = by_id[chosen]
        loads = [self._replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas]
        known = [n for n in loads if n is not None]
        mine = self._replica_queue_len_cache.get(best.replica_id)
        if mine is not None and known and mine - min(known) > self._imbalance:
            return [_shuffled(candidate_replicas)]
        # Only the affine replica, a few times: its queue-length probe can miss Ray's 0.1 s deadline on a
        # busy machine, and offering the others too would then send the conversation elsewhere. Ray
        # retries with a doubled deadline; after `patience` tries any replica will do.
        key = _request_key(pending_request)
        tries = self._tries.get(key, 0) + 1
        self._tries[key] = tries
        if len(self._tries) > 10_000:
            self._tries.clear()
        if tries > self._patience:
            return [_shuffled(candidate_replicas)]
        return [[best]]


def _shuffled(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Ray takes the first of equally loaded candidates: shuffle so idle replicas share new conversations."""
    return random.sample(replicas, len(replicas))


def _request_key(pending_request: PendingRequest | None) -> object:
    metadata = getattr(pending_request, "metadata", None)
    return getattr(metadata, "internal_request_id", None) or id(pending_request)


def _preferred(pending_request: PendingRequest | None) -> str | None:
    for arg in getattr(pending_request, "args", None) or ():
        if hasattr(arg, "preferred"):  # a ReplicaJob (duck-typed: Ray may hand over a copy of the class)
            return arg.preferred
    return None
