"""The ingress's engine: the AsyncEngine interface that `slimlm.server` uses, answered by Ray replicas.

`submit()` sends the prompts to the `EngineReplica` deployment through its handle (the prefix-affinity
router picks the replica) and waits for the replica to accept them, so a refused prompt is the same 400
as on one machine. A replica that dies before accepting is retried once on another; one that dies while
streaming ends that request with an EngineFailure (500, or an error event in the stream). Each replica's
counters arrive with its answers; `snapshot` sums the latest of every replica for /metrics.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging

from slimlm.cluster.router import AffinityTable, ReplicaJob, block_hashes
from slimlm.errors import SlimlmError
from slimlm.server.async_engine import EngineFailure, EngineSnapshot
from slimlm.server.errors import APIError

log = logging.getLogger("slimlm.cluster")

# Set by the replica-header middleware for each HTTP request: a dict that submit() fills with the replica.
served_by: contextvars.ContextVar[dict | None] = contextvars.ContextVar("slimlm_served_by", default=None)

_UNAVAILABLE = "no engine replica could take the request ({}); retry shortly"


class RemoteEngine:
    def __init__(self, handle, block_size: int) -> None:
        self.handle = handle.options(stream=True)
        self.block_size = block_size
        self.replica_snapshots: dict[str, EngineSnapshot] = {}
        self.routed: dict[str, int] = {}  # requests accepted per replica
        self.affinity = AffinityTable()  # prompt ends -> replica: where each conversation's cache is

    # -- what AsyncEngine offers the server -------------------------------------------------------------

    def start(self) -> None:  # the replicas run on their own
        pass

    def shutdown(self, timeout: float = 10.0) -> None:
        pass

    @property
    def is_running(self) -> bool:
        return True

    @property
    def snapshot(self) -> EngineSnapshot:
        total = EngineSnapshot()
        for snap in self.replica_snapshots.values():
            for f in dataclasses.fields(EngineSnapshot):
                setattr(total, f.name, getattr(total, f.name) + getattr(snap, f.name))
        return total

    async def submit(self, requests) -> RemoteStream:
        if not requests:
            raise SlimlmError("nothing to generate: the request holds no prompt")
        hashes = block_hashes(requests[0][0], self.block_size)
        job = ReplicaJob(requests, hashes, self.affinity.lookup(hashes, set(self.routed)))
        for attempt in range(2):
            response = self.handle.generate.remote(job)
            try:
                first = await response.__anext__()
            except Exception as e:  # the replica died or was never reached: nothing ran yet
                response.cancel()
                if job.preferred is not None:
                    self.affinity.forget({job.preferred})  # probably dead: its cache is gone too
                    job.preferred = None
                if attempt == 0:
                    log.warning("replica unavailable (%s); retrying on another", type(e).__name__)
                    continue
                raise APIError(
                    503, _UNAVAILABLE.format(type(e).__name__), code="replica_unavailable"
                ) from None
            if "error" in first:
                raise SlimlmError(first["error"])
            if "failure" in first:
                raise EngineFailure(first["failure"])
            replica = first["replica"]
            self.affinity.remember(hashes, replica)
            self.routed[replica] = self.routed.get(replica, 0) + 1
            holder = served_by.get()
            if holder is not None:
                holder["replica"] = replica
            log.info("request of %d prompt tokens served by replica %s", len(requests[0][0]), replica)
            return RemoteStream(self, response, replica)
        raise AssertionError("unreachable")


class RemoteStream:
    """Async iterator of (choice index, StepOutput) from one replica; `abort()` cancels it."""

    def __init__(self, engine: RemoteEngine, response, replica: str) -> None:
        self.engine = engine
        self.response = response
        self.replica = replica
        self.finished = False

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        try:
            async for message in self.response:
                if isinstance(message, list):
                    for item in message:
                        yield item
                elif "snapshot" in message:
                    self.engine.replica_snapshots[self.replica] = message["snapshot"]
                elif "failure" in message:
                    raise EngineFailure(message["failure"])
        except EngineFailure:
            raise
        except Exception as e:  # the replica's actor died, or Ray lost it
            log.warning("replica %s failed mid-request: %s", self.replica, type(e).__name__)
            self.engine.affinity.forget({self.replica})  # a restarted replica has an empty cache
            raise EngineFailure(f"replica {self.replica} failed ({type(e).__name__})") from None
        finally:
            self.finished = True

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.response.cancel()
