"""Measured training memory next to the planner's prediction.

Measured:
- tensor bytes: on CUDA `torch.cuda.max_memory_allocated`; on CPU the planner's `TensorMemoryTracker`
  (a TorchDispatchMode counting live tensor storages op by op) over the first two steps, i.e. until the
  optimizer states exist (steady state), since tracking every op slows a step down;
- peak RSS of the process (`ru_maxrss`): everything, Python and allocator caches included.
Predicted: `slimlm.plan.training.plan_training` for the same settings on this device.
"""

from __future__ import annotations

import resource
import sys
from contextlib import nullcontext

import torch
from torch import nn

from slimlm.formats.sizes import format_bytes
from slimlm.train.config import TrainConfig

TRACKED_STEPS = 2


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


class StepMemory:
    """Enter `track(step)` around each optimizer step; `peak_bytes` is the tensor peak seen."""

    def __init__(self, device: torch.device, enabled: bool, existing: list[torch.Tensor]) -> None:
        self.device = device
        self.enabled = enabled
        self.peak_bytes: int | None = None
        self._tracker = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif enabled:
            from slimlm.plan.measure import TensorMemoryTracker

            self._tracker = TensorMemoryTracker()
            self._tracker.track_existing(existing)

    def track(self, steps_done_here: int):
        if self._tracker is not None and steps_done_here < TRACKED_STEPS:
            return self._tracker
        return nullcontext()

    def after_step(self, steps_done_here: int, optimizer: torch.optim.Optimizer) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._tracker is not None and steps_done_here <= TRACKED_STEPS:
            self.peak_bytes = self._tracker.peak

    def current_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return current_rss_bytes()


def planned_peak(cfg: TrainConfig, model_config, precision: str, seq_len: int, world_size: int,
                 strategy: str, device: torch.device, qlora_group: int | None = None) -> tuple[int | None, str]:  # fmt: skip
    """(predicted peak bytes per device, note). None with the reason when the planner cannot answer."""
    try:
        from slimlm.plan.devices import cpu_device, local_cuda_device
        from slimlm.plan.shapes import LINEAR_NAMES
        from slimlm.plan.training import TrainingSettings, plan_training
    except ImportError as e:  # integration point: the planner is a separate part of slimlm
        return None, f"planner unavailable ({e})"
    targets = tuple(t for t in cfg.lora_targets if t in LINEAR_NAMES) or LINEAR_NAMES
    try:
        settings = TrainingSettings(
            method=cfg.method,
            precision="fp32" if precision == "fp32" else "mixed",
            optimizer=cfg.optim,  # the planner speaks slimlm train's names
            micro_batch=cfg.batch_size,
            seq_len=seq_len,
            gradient_checkpointing=cfg.gradient_checkpointing,
            flash_attention=True,  # SDPA's fused kernels keep no [seq, seq] scores, on CPU too
            lora_rank=cfg.lora_rank,
            lora_targets=targets,
            lora_dropout=cfg.lora_dropout,
            loss_chunk_tokens=cfg.loss_chunk_tokens,  # the trainer's loss runs over chunks of this many tokens
            qlora_group_size=qlora_group or 64,
            grad_accumulation=cfg.grad_accum,
            zero_stage=3 if strategy == "fsdp" else 0,
            num_devices=world_size,
        )
        dev = local_cuda_device() if device.type == "cuda" else cpu_device()
        plan = plan_training(model_config, dev, settings)
    except Exception as e:  # a planner limitation must never stop training
        return None, f"planner failed ({type(e).__name__}: {e})"
    return plan.total_bytes, f"peak at {plan.peak_phase}"


def model_tensors(model: nn.Module, extra: list[torch.Tensor]) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers(), *extra]


def fmt_bytes(n: int | None) -> str:
    return format_bytes(n, digits=1)


__all__ = ["StepMemory", "current_rss_bytes", "fmt_bytes", "peak_rss_bytes", "planned_peak"]
