"""The memory a plan must fit in: a GPU preset, an explicit size, this machine's RAM, or the local GPU."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.plan.units import MiB, parse_bytes

PRESETS_DIR = Path(__file__).parent / "presets"
# What PyTorch's CUDA context takes before any tensor exists; it varies with GPU, driver and CUDA version
# (lazy module loading keeps it near this). An estimate; override with cuda_context_bytes.
DEFAULT_CUDA_CONTEXT_BYTES = 512 * MiB


@dataclass(frozen=True)
class Device:
    """`total_bytes`: the memory of one device. `usable_bytes`: what a plan may use (for the CPU: RAM
    available now, not all of it). `kind`: "gpu" (a CUDA context is paid) or "cpu"."""

    name: str
    total_bytes: int
    usable_bytes: int
    kind: str
    cuda_context_bytes: int = 0
    source: str = ""


@cache
def gpu_presets() -> dict[str, dict]:
    return json.loads((PRESETS_DIR / "devices.json").read_text())["devices"]


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """MemTotal / MemAvailable etc. in bytes (the kernel writes kB = 1024 bytes)."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def cpu_device() -> Device:
    info = read_meminfo()
    if "MemTotal" not in info:
        import os

        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    else:
        total, available = info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    return Device(
        "cpu (this machine's RAM)", total, available, "cpu", 0, "/proc/meminfo MemTotal, MemAvailable"
    )


def local_cuda_device() -> Device:
    import torch

    if not torch.cuda.is_available():
        raise SlimlmError(
            "--device cuda asks for the local GPU but none is available; name a preset or give --device-memory"
        )
    free, total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name()
    # mem_get_info runs after the context exists, so `free` already excludes it.
    return Device(name, total, free, "gpu", 0, "torch.cuda.mem_get_info (context already paid)")


def describe_device(
    spec: str | None = None, memory: str | int | None = None, cuda_context_bytes: int | None = None
) -> Device:
    """`spec`: a GPU preset name, 'cpu', 'cuda' (the local GPU) or None; `memory`: '24GiB' / '24GB' / bytes.

    With only `memory`, the device is a GPU of that size. With both, the preset's kind with that size.
    """
    context = DEFAULT_CUDA_CONTEXT_BYTES if cuda_context_bytes is None else cuda_context_bytes
    if context < 0:
        raise SlimlmError(f"the CUDA context size must be >= 0, got {context}")
    size = parse_bytes(memory, "--device-memory") if memory is not None else None
    key = (spec or "").strip().lower()
    if key == "cpu":
        dev = cpu_device()
        if size is not None:
            return Device("cpu", size, size, "cpu", 0, "--device-memory")
        return dev
    if key == "cuda":
        return local_cuda_device()
    if not key:
        if size is None:
            raise SlimlmError(
                "give a device: --device NAME (e.g. rtx4090, a100-80g, cpu) or --device-memory 24GiB"
            )
        return Device(f"{memory} device", size, size, "gpu", context, "--device-memory")
    presets = gpu_presets()
    if key not in presets:
        close = difflib.get_close_matches(key, list(presets) + ["cpu", "cuda"], n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise SlimlmError(f"unknown device {spec!r}{hint}; known: {', '.join(sorted(presets))}, cpu, cuda")
    total = presets[key]["total_mib"] * MiB if size is None else size
    return Device(presets[key]["name"], total, total, "gpu", context, f"preset {key}")
