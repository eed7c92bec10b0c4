"""One Ray Serve replica: a whole slimlm engine (`LLM` + `AsyncEngine`) pinned to `--threads` CPU threads.

`generate(job)` is a streaming method: it yields `{"replica": id}` once the engine accepted the prompts,
then lists of (choice index, StepOutput) as steps produce them, and finally `{"snapshot": EngineSnapshot}`
(this replica's counters, for the ingress's /metrics). A prompt the engine refuses yields `{"error": msg}`
(the ingress answers 400); an engine failure yields `{"failure": msg}` (500). Cancelling the stream (the
client left) aborts the sequences.
"""

from __future__ import annotations

import argparse
import logging

from slimlm.cluster.router import ReplicaJob
from slimlm.errors import SlimlmError

log = logging.getLogger("slimlm.cluster")


class EngineReplica:
    def __init__(self, engine_args: dict, threads: int) -> None:
        import torch

        from slimlm.commands.common import llm_from_args
        from slimlm.server.async_engine import AsyncEngine

        torch.set_num_threads(threads)  # the decode kernel and torch both use this many
        args = argparse.Namespace(**{**engine_args, "threads": threads})
        self.llm = llm_from_args(args, progress=False)
        self.engine = AsyncEngine(self.llm)
        self.engine.start()
        self.replica_id = _replica_id()
        log.info("replica %s ready (%d threads)", self.replica_id, threads)

    async def generate(self, job: ReplicaJob):
        from slimlm.server.async_engine import EngineFailure

        try:
            stream = await self.engine.submit(job.requests)
        except SlimlmError as e:
            yield {"error": str(e)}
            return
        except EngineFailure as e:
            yield {"failure": str(e)}
            return
        try:
            yield {"replica": self.replica_id}
            async for batch in _step_batches(stream):
                yield batch
            yield {"snapshot": self.engine.snapshot}
        except EngineFailure as e:
            yield {"failure": str(e)}
        finally:
            stream.abort()  # the client went away (cancelled) or the stream ended: nothing left running

    def check_health(self) -> None:
        """Ray Serve calls this periodically; a replica whose engine thread died is replaced."""
        if not self.engine.is_running:
            raise RuntimeError("the engine thread stopped")


async def _step_batches(stream):
    """The stream's outputs one engine step at a time ([(choice index, StepOutput)]): one Ray message per
    step instead of one per token of each choice. Reads the RequestStream's queue, as its iterator does."""
    group, index, unfinished = stream._group, stream._index, stream._unfinished
    while unfinished:
        batch = await group.outputs.get()
        if isinstance(batch, BaseException):
            unfinished.clear()
            raise batch
        for out in batch:
            if out.finished:
                unfinished.discard(out.seq_id)
        yield [(index[out.seq_id], out) for out in batch]


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Ray Serve (unit use)
        return "local"
