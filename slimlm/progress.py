"""Progress bars (rich) on a terminal; plain, throttled lines when stderr is a file or a pipe."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PLAIN_EVERY_S = 10.0  # without a terminal: one line per this many seconds, none for quick work


@contextmanager
def progress_bar(label: str, total: int | None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n=1)`; renders a rich bar on stderr when enabled."""
    if not enabled:
        yield lambda n=1: None
        return
    if not sys.stderr.isatty():
        # rich draws nothing off a terminal but an empty line when it stops, which then stood before
        # every error message; long work still says how far it got.
        yield _plain_lines(label, total)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


def _plain_lines(label: str, total: int | None) -> Callable[[int], None]:
    start = time.monotonic()
    state = {"done": 0, "last": start}

    def advance(n: int = 1) -> None:
        state["done"] += n
        now = time.monotonic()
        if now - state["last"] >= PLAIN_EVERY_S:
            state["last"] = now
            of = f"/{total}" if total else ""
            print(f"{label}: {state['done']}{of} ({now - start:.0f}s)", file=sys.stderr, flush=True)

    return advance
