"""Byte sizes in and out, one spelling for every flag: GB = 10^9 bytes, GiB = 2^30 bytes (both accepted)."""

from __future__ import annotations

import argparse
import re

from slimlm.errors import SlimlmError

GB = 10**9
GiB = 2**30
MiB = 2**20

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}  # fmt: skip


class SizeError(SlimlmError, argparse.ArgumentTypeError):
    """A size that does not parse: a SlimlmError for the library, and argparse's one-line flag error."""


def parse_size(text: str | int | float, what: str = "size", unit_required: bool = False,
               positive: bool = False) -> int:  # fmt: skip
    """'512MiB', '2GB', '1.5GiB', '1e9B', '1000000' -> bytes (GB = 10^9, GiB = 2^30).

    `unit_required`: a bare number is an error (a device's memory); `positive`: 0 is an error."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = int(text)
    else:
        match = _SIZE.match(str(text))
        unit = (match.group(2) or "").lower() if match else ""
        if not match or unit not in _UNITS or (unit_required and not unit):
            hint = " (a unit is required)" if match and unit_required and not unit else ""
            raise SizeError(
                f"{what} {text!r} is not a size{hint}; write e.g. 24GiB (2^30 bytes), 24GB (10^9 bytes) or 512MiB"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 0 or (positive and value == 0):
        raise SizeError(f"{what} must be positive, got {text!r}")
    return value


def format_bytes(n: int | float | None, digits: int = 2) -> str:
    """Bytes in the largest binary unit that fits: '1.50 GiB', '512 B'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.{digits}f} {unit}"
    return f"{n} B"


def format_in(n: int | float, unit: str = "GiB") -> str:
    """Bytes in one fixed unit ('GiB' or 'GB', 'MiB', 'MB'), so columns compare at a glance."""
    scale = {"GiB": GiB, "GB": GB, "MiB": MiB, "MB": 10**6}[unit]
    value = n / scale
    return f"{value:,.2f} {unit}" if abs(value) < 100 else f"{value:,.1f} {unit}"


__all__ = ["GB", "GiB", "MiB", "SizeError", "format_bytes", "format_in", "parse_size"]
