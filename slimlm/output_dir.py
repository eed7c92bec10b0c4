"""Output directories of quantize / merge: never overlapping their inputs, never half-written.

A command writes into a hidden staging directory beside the output (`.<name>.partial-<pid>`) that holds
an INCOMPLETE_MARKER file, and moves the finished files into place only at the end. An interrupted
run therefore leaves no `<name>` (or, with --overwrite, the old files) and a staging directory that
`slimlm.loading.load` reports as an incomplete output instead of blaming a missing tokenizer.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimlm.errors import SlimlmError

INCOMPLETE_MARKER = ".slimlm-incomplete"


def check_not_overlapping(out: str | Path, source: str | Path, flag: str, what: str) -> None:
    """Refuse an output that is the source, lies inside a source directory, or contains the source:
    writing there replaces (or mixes with) the files the command reads."""
    out_r = Path(out).expanduser().resolve()
    src = Path(source).expanduser().resolve()
    if out_r == src or out_r in src.parents or (src.is_dir() and src in out_r.parents):
        raise SlimlmError(f"{flag} {out_r} overlaps {what} {src}; choose a directory outside it")


def incomplete_output_error(path: Path) -> SlimlmError | None:
    """The error for loading a directory that a quantize / merge left unfinished (None if it is not one)."""
    if (path / INCOMPLETE_MARKER).exists():
        return SlimlmError(
            f"{path} is an incomplete output: the slimlm quantize/merge writing it was interrupted; "
            "delete it and run that command again"
        )
    return None


@contextmanager
def staged_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a staging directory to write into; on success its files become `out`'s.

    `out` must not exist, be empty, or (with `overwrite`) the files written replace those of the same
    name in it. On any error or interrupt the staging directory is removed and `out` is untouched.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SlimlmError(f"output directory {out} is not empty; choose a new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / INCOMPLETE_MARKER).write_text("written by slimlm; removed when the output is complete\n")
    except OSError as e:
        raise SlimlmError(f"cannot create the output {out}: {e.strerror or e}") from None
    try:
        yield tmp
        (tmp / INCOMPLETE_MARKER).unlink()
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    for entry in tmp.iterdir():  # --overwrite: replace file by file (each one atomically)
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)


__all__ = ["INCOMPLETE_MARKER", "check_not_overlapping", "incomplete_output_error", "staged_output"]
