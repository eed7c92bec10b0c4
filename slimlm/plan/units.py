"""Byte sizes in and out for the planner (slimlm.formats.sizes): a device's memory needs a unit."""

from __future__ import annotations

from slimlm.formats.sizes import GB, GiB, MiB, format_in, parse_size

fmt_bytes = format_in  # one fixed unit per table column


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """'24GiB' -> 25769803776, '24GB' -> 24000000000, '512MiB', '1e9B'. A unit is required, 0 is not a size."""
    return parse_size(text, what, unit_required=True, positive=True)


__all__ = ["GB", "GiB", "MiB", "fmt_bytes", "parse_bytes"]
