"""One line of a memory breakdown: what it is, how many bytes, and whether the number is exact."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    """`exact`: True when the bytes are what slimlm allocates for these settings (weights, KV cache, optimizer
    states, gradients), False for estimates from a documented formula (activations, workspaces, contexts)."""

    name: str
    bytes: int
    exact: bool
    note: str = ""
    host: bool = False  # lives in CPU RAM (optimizer offload), not on the device


def device_total(components: list[Component]) -> int:
    return sum(c.bytes for c in components if not c.host)


def host_total(components: list[Component]) -> int:
    return sum(c.bytes for c in components if c.host)
