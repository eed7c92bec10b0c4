"""Data parallel (DDP) and fully sharded (FSDP2) training through torch.distributed, nothing home-made.

Start several processes with torchrun (`torchrun --nproc-per-node 2 -m slimlm.cli train ...`) or any
launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. The backend is gloo on
CPU and nccl on CUDA. Every process builds the same global batch order and takes every world_size-th
micro-batch of each step; gradients are averaged by DDP / reduce-scattered by FSDP.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from slimlm.errors import SlimlmError


@dataclass
class DistributedInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # "none" | "ddp" | "fsdp"
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(strategy: str, device_type: str) -> DistributedInfo:
    """Join the process group the launcher describes; a single process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        if strategy in ("ddp", "fsdp"):
            raise SlimlmError(
                f"--distributed {strategy} needs several processes; launch with torchrun --nproc-per-node N"
            )
        return DistributedInfo()
    if not dist.is_available():
        raise SlimlmError("this torch build has no torch.distributed; run a single process")
    here = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise SlimlmError("WORLD_SIZE is set but MASTER_ADDR is not; launch with torchrun")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        here = True
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank,
                           "ddp" if strategy == "auto" else strategy, here)  # fmt: skip


def wrap_model(
    module: nn.Module,
    info: DistributedInfo,
    device: torch.device,
    layers: nn.ModuleList,
    offload: bool = False,
) -> nn.Module:
    """DDP around the training module, or FSDP2 `fully_shard` on each decoder layer and the root.

    `offload` (FSDP on a GPU): CPUOffloadPolicy keeps the sharded parameters, gradients and so the optimizer
    states in CPU memory; the optimizer step runs on the CPU.
    """
    if not info.enabled:
        return module
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        policy = CPUOffloadPolicy() if offload and device.type != "cpu" else OffloadPolicy()
        for layer in layers:
            fully_shard(layer, offload_policy=policy)
        fully_shard(module, offload_policy=policy)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def gradient_sync(model: nn.Module, info: DistributedInfo, sync: bool):
    """Context for one micro-batch's backward: all-reduce gradients only on the last of a step."""
    if info.strategy == "ddp" and not sync:
        return model.no_sync()
    if info.strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def all_reduce_sum(values: list[float], info: DistributedInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistributedInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistributedInfo):
    """rank 0's `obj` on every process (errors found by rank 0 reach all of them)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_trainable_state(
    model: nn.Module, inner: nn.Module, info: DistributedInfo
) -> dict[str, torch.Tensor]:
    """The trainable parameters by the inner model's names, gathered on rank 0 under FSDP."""
    names = [n for n, p in inner.named_parameters() if p.requires_grad]
    if info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: full["model." + n] for n in names} if info.is_main else {}
    params = dict(inner.named_parameters())
    return {n: params[n].detach() for n in names}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistributedInfo) -> dict:
    if info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_trainable_state(
    model: nn.Module, inner: nn.Module, state: dict[str, torch.Tensor], info: DistributedInfo
) -> None:
    if info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, {"model." + k: v for k, v in state.items()}, options=options)
        return
    params = dict(inner.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistributedInfo
) -> None:
    by_name = any(isinstance(k, str) for k in state.get("state", {}))  # a full state dict saved under FSDP
    if info.strategy == "fsdp" or (by_name and not info.enabled):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def shutdown(info: DistributedInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DistributedInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "full_optimizer_state",
    "full_trainable_state",
    "gradient_sync",
    "init_distributed",
    "load_optimizer_state",
    "load_trainable_state",
    "shutdown",
    "wrap_model",
]
