"""Measure what the planner predicts: live tensor storage bytes and their peak, op by op.

`TensorMemoryTracker` is a `TorchDispatchMode`: every aten op run inside it (forward, backward, optimizer
step) passes through `__torch_dispatch__`, where each output tensor whose storage is new (not an input's,
so views and in-place results are not counted twice) is recorded with its storage's byte size. PyTorch
keeps one Python object per storage for as long as the storage lives, so a `weakref.finalize` on it
fires exactly when the last tensor using the storage is gone, tensors that autograd saved for backward
included. The peak is the largest sum of live storage bytes seen after any op: the tensor memory an exact
allocator would need. Allocator rounding and caching (CUDA's block sizes, glibc arenas) and scratch
buffers inside kernels are not in it.

Tensors that already exist when tracking starts (weights, optimizer states) are counted by passing them
to `track_existing`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage(t: object) -> torch.UntypedStorage | None:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.is_sparse:
        return None
    return t.untyped_storage()


class TensorMemoryTracker(TorchDispatchMode):
    """Live tensor bytes (`current`) and their high-water mark (`peak`) while the mode is active.

    Example::

        tracker = TensorMemoryTracker()
        tracker.track_existing(model.parameters())
        with tracker:
            loss = model(x).sum(); loss.backward(); opt.step()
        print(tracker.peak)
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # id(storage) -> bytes
        self.current = 0
        self.peak = 0
        self.peak_op = ""  # the aten op right after which the peak was reached

    def track_existing(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors allocated before tracking began (each storage once)."""
        for t in tensors:
            storage = _storage(t)
            if storage is not None:
                self._add(storage)
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def live_bytes(self) -> int:
        return self.current

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs: set[int] | None = None
        for t in tree_flatten(out)[0]:
            storage = _storage(t)
            if storage is None or id(storage) in self._live:
                continue
            if inputs is None:  # a view or in-place result of a tensor we were not told about
                flat = tree_flatten((args, kwargs))[0]
                inputs = {id(s) for s in map(_storage, flat) if s is not None}
            if id(storage) not in inputs:
                self._add(storage)
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, str(func)
        return out


def tensors_of_optimizer(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor in an optimizer's state (for `track_existing`)."""
    flat, _ = tree_flatten([dict(s) for s in optimizer.state.values()])
    return [t for t in flat if isinstance(t, torch.Tensor)]
