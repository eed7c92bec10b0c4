"""The training progress display: a rich bar with loss, tokens/s and memory on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys

from slimlm.train.memory import fmt_bytes


class TrainProgress:
    """`with TrainProgress(total, start, enabled) as p: p.update(step, loss, tok_s, mem); p.print(text)`."""

    def __init__(self, total: int, start: int, enabled: bool, log_every: int = 1) -> None:
        self.total, self.start, self.enabled, self.log_every = total, start, enabled, log_every
        self._bar = None
        self._task = None
        self._console = None

    def __enter__(self) -> TrainProgress:
        if not self.enabled:
            return self
        from rich.console import Console

        self._console = Console(stderr=True)
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = (
                TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TextColumn("mem {task.fields[mem]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            )  # fmt: skip
            self._bar = Progress(*columns, console=self._console)
            self._bar.__enter__()
            self._task = self._bar.add_task(
                "train", total=self.total, completed=self.start, loss="-", speed="-", mem="-"
            )
        return self

    def update(self, step: int, loss: float, tokens_per_s: float, mem_bytes: int, lr: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=step,
                loss=f"{loss:.4f}",
                speed=f"{tokens_per_s:,.0f}",
                mem=fmt_bytes(mem_bytes),
            )
        elif step % self.log_every == 0 or step == self.total:
            self.print(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  mem {fmt_bytes(mem_bytes)}"
            )

    def print(self, text: str) -> None:
        if self.enabled:
            self._console.print(text, highlight=False, markup=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


__all__ = ["TrainProgress"]
