"""Byte sizes in and out. GB = 10^9 bytes, GiB = 2^30 bytes; both are accepted and the output says which."""

from __future__ import annotations

import re

from slimlm.errors import SlimlmError

GB = 10**9
GiB = 2**30
MiB = 2**20

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """'24GiB' -> 25769803776, '24GB' -> 24000000000, '512MiB', '1e9B'. A unit is required."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text <= 0:
            raise SlimlmError(f"{what} must be positive, got {text}")
        return int(text)
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        hint = " (a unit is required)" if match and not unit else ""
        raise SlimlmError(
            f"{what} {text!r} is not a size{hint}; write e.g. 24GiB (2^30 bytes), 24GB (10^9 bytes) or 512MiB"
        )
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise SlimlmError(f"{what} must be positive, got {text!r}")
    return value


def fmt_bytes(n: int | float, unit: str = "GiB") -> str:
    """Bytes in one fixed unit ('GiB' or 'GB', 'MiB', 'MB'), so columns compare at a glance."""
    scale = {"GiB": GiB, "GB": GB, "MiB": MiB, "MB": 10**6}[unit]
    value = n / scale
    return f"{value:,.2f} {unit}" if abs(value) < 100 else f"{value:,.1f} {unit}"
