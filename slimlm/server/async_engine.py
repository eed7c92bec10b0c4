"""One background thread owns the (not thread-safe) engine; HTTP handlers talk to it through queues.

Handlers on the asyncio loop `submit()` requests and `abort()` them through a thread-safe command
queue. The engine thread drains that queue between steps, so requests that arrive while others run
join the next step (continuous batching across HTTP clients). Each step's outputs are handed back to
the submitting loop with `loop.call_soon_threadsafe`, into one asyncio queue per request group.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from slimlm.engine.engine import StepOutput
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError

log = logging.getLogger("slimlm.server")

_IDLE_POLL_S = 0.5  # how often an idle engine thread looks at its stop flag


class EngineFailure(RuntimeError):
    """The engine raised while running a step; the affected requests cannot finish."""


@dataclass
class EngineSnapshot:
    """Counters published by the engine thread after every step (read by /metrics without locks)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    engine_failures: int = 0

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class _Group:
    """Sequences of one HTTP request (n choices, several prompts) sharing one asyncio queue."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    accepted: asyncio.Future
    requests: list[tuple[list[int], SamplingParams]]
    seq_ids: list[int] = field(default_factory=list)


class RequestStream:
    """Async iterator of (choice index, StepOutput) for one submitted group; ends when all choices
    finished. Leaving it early (break, cancellation, client gone) must be followed by `abort()`;
    `async with` or `finally: stream.abort()` does it."""

    def __init__(self, engine: AsyncEngine, group: _Group) -> None:
        self._engine = engine
        self._group = group
        self._index = {seq_id: i for i, seq_id in enumerate(group.seq_ids)}
        self._unfinished = set(group.seq_ids)

    @property
    def seq_ids(self) -> list[int]:
        return list(self._group.seq_ids)

    def __aiter__(self) -> AsyncIterator[tuple[int, StepOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, StepOutput]]:
        while self._unfinished:
            batch = await self._group.outputs.get()
            if isinstance(batch, BaseException):
                self._unfinished.clear()
                raise batch
            for out in batch:
                if out.finished:
                    self._unfinished.discard(out.seq_id)
                yield self._index[out.seq_id], out

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def abort(self) -> None:
        """Cancel the choices that are still running (idempotent, safe from any thread)."""
        if self._unfinished:
            self._engine._commands.put(("abort", list(self._unfinished)))
            self._unfinished.clear()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


class AsyncEngine:
    """Runs `llm.engine`'s step loop on a dedicated thread and serves many asyncio clients."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.engine = llm.engine
        self._commands: queue.Queue = queue.Queue()
        self._groups: dict[int, _Group] = {}  # seq_id -> group; touched only by the engine thread
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._here = False  # run_here() drives the loop on its caller's thread: start() adds none
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self.snapshot = EngineSnapshot()
        self._aborted = 0
        self._failures = 0
        self._publish()

    # ---- lifecycle ----
    def start(self) -> None:
        with self._start_lock:
            if self._here:  # the loop runs (or ran) on run_here's caller; never a second one
                if self._stop.is_set():
                    raise EngineFailure("the server is shutting down")
                return
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="slimlm-engine", daemon=True)
                self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still running end with an EngineFailure."""
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            if not self._here:  # run_here's caller returns on its own once the loop ends
                self._thread.join(timeout)
            self._thread = None

    def run_here(self, until=None, on_start=None) -> None:
        """Run the step loop on the calling thread (the main thread in `slimlm serve`) until
        `shutdown()` or until `until()` turns true; uvicorn then runs on another thread.

        Why not always a thread of its own: decode steps driven from a thread other than the one that
        loaded the model ran about a third slower on a 2-core machine (libgomp then keeps a second
        OpenMP thread pool; docs/serve.md), while the asyncio loop costs little on any thread."""
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("the engine loop already runs on a thread of its own")
            self._here, self._thread = True, threading.current_thread()
            self._stop.clear()
        try:
            if on_start is not None:  # e.g. start uvicorn: its start() calls find the loop claimed
                on_start()
            self._run(until)
        finally:
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # ---- the asyncio side ----
    async def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> RequestStream:
        """Queue prompts (token ids) with their params; raises SlimlmError when the engine refuses one
        (e.g. the prompt cannot fit the context or the KV cache), in which case none of them runs."""
        if not requests:
            raise SlimlmError("nothing to generate: the request holds no prompt")
        self.start()
        loop = asyncio.get_running_loop()
        group = _Group(loop, asyncio.Queue(), loop.create_future(), requests)
        group.seq_ids = [next(self._ids) for _ in requests]
        self._commands.put(("add", group))
        try:
            await group.accepted
        except asyncio.CancelledError:
            self._commands.put(("abort", list(group.seq_ids)))
            raise
        return RequestStream(self, group)

    async def run(self, fn, *args):
        """Run `fn(*args)` on the engine thread between two steps (the model is not shared with another
        thread, and the work takes its turn with the running requests) and return its result."""
        self.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("call", (loop, future, fn, args)))
        return await future

    # ---- the engine thread ----
    def _run(self, until=None) -> None:
        while not self._stop.is_set() and not (until is not None and until()):
            self._drain_commands(block=not self.engine.has_unfinished())
            if self._stop.is_set() or not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # keep serving: fail the requests in flight, not the server
                log.exception("engine step failed; aborting the requests in flight")
                self._failures += 1
                self._fail_all(EngineFailure(f"{type(e).__name__} in the engine step"))
                continue
            self._dispatch(outputs)
            self._publish()
        self._fail_all(EngineFailure("the server is shutting down"))

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self._publish()

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            self._add(payload)
        elif kind == "call":
            loop, future, fn, args = payload
            try:
                result, error = fn(*args), None
            except Exception as e:  # the caller gets the error; the engine keeps serving
                result, error = None, e
            loop.call_soon_threadsafe(_settle, future, error, result)
        elif kind == "abort":
            for seq_id in payload:
                if self._groups.pop(seq_id, None) is not None:
                    self.engine.abort(seq_id)
                    self._aborted += 1

    def _add(self, group: _Group) -> None:
        added: list[int] = []
        try:
            for seq_id, (prompt_ids, params) in zip(group.seq_ids, group.requests, strict=True):
                self.engine.add_request(prompt_ids, params, seq_id)
                added.append(seq_id)
                self._groups[seq_id] = group
        except Exception as e:
            for seq_id in added:
                self._groups.pop(seq_id, None)
                self.engine.abort(seq_id)
            error = (
                e
                if isinstance(e, SlimlmError)
                else EngineFailure(f"{type(e).__name__} while adding a request")
            )
            group.loop.call_soon_threadsafe(_settle, group.accepted, error)
            return
        group.loop.call_soon_threadsafe(_settle, group.accepted, None)

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        per_group: dict[int, tuple[_Group, list[StepOutput]]] = {}
        for out in outputs:
            group = self._groups.get(out.seq_id)
            if group is None:  # aborted by its client while this step ran
                continue
            per_group.setdefault(id(group), (group, []))[1].append(out)
            if out.finished:
                del self._groups[out.seq_id]
        for group, outs in per_group.values():
            _deliver(group, outs)

    def _fail_all(self, error: BaseException) -> None:
        groups = {id(g): g for g in self._groups.values()}
        for seq_id in list(self._groups):
            self.engine.abort(seq_id)
        # sequences the engine still holds without a client (should not happen) are dropped too
        for seq_id in list(getattr(self.engine, "seqs", {})):
            self.engine.abort(seq_id)
        self._groups.clear()
        for group in groups.values():
            _deliver(group, error)
        self._publish()

    def _publish(self) -> None:
        engine = self.engine
        stats = engine.stats
        self.snapshot = EngineSnapshot(
            num_running=engine.scheduler.num_running,
            num_waiting=engine.scheduler.num_waiting,
            kv_blocks_total=engine.budget.num_blocks,
            kv_blocks_free=engine.block_manager.num_free_blocks,
            prompt_tokens=stats.prompt_tokens,
            computed_prompt_tokens=stats.computed_prompt_tokens,
            generated_tokens=stats.generated_tokens,
            steps=stats.steps,
            preemptions=stats.preemptions,
            requests_finished=stats.requests_finished,
            requests_aborted=self._aborted,
            engine_failures=self._failures,
        )


def _settle(future: asyncio.Future, error: BaseException | None, result: object = None) -> None:
    if future.done():  # the client went away while waiting
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _deliver(group: _Group, item: list[StepOutput] | BaseException) -> None:
    try:
        group.loop.call_soon_threadsafe(group.outputs.put_nowait, item)
    except RuntimeError:  # the client's loop is closed (server shutting down)
        pass
