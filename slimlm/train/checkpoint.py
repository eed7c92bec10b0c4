"""Training checkpoints that resume exactly: same weights, optimizer, schedule, RNG and data position.

A checkpoint is a directory `<output>/checkpoints/step-000042/` holding
    trainable.safetensors   the trainable parameters (LoRA adapters, or every weight in full fine-tuning)
    optimizer.pt            optimizer.state_dict() of torch AdamW (full state dict under FSDP)
    optimizer_rank{r}.pt    the low-bit optimizers' states, one file per shard (train/optim_shards.py)
    scheduler.pt            the lr scheduler's state_dict()
    rng_rank{r}.pt          Python and torch (CPU, CUDA) RNG states of each process
    trainer_state.json      step, epoch, position in the epoch, loss history and the run's fingerprint
It is written under a temporary name and renamed when complete, so an interrupted save never becomes
the newest checkpoint. The fingerprint (trajectory settings, model, data, world size) must match on resume,
except that processes and accumulation may trade places when their product (the global batch) is kept.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimlm.errors import SlimlmError

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
FORMAT_VERSION = 1
# How long the run is: a resume may change them; the lr schedule is then recomputed for the new length.
LENGTH_SETTINGS = ("epochs", "max_steps")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    tokens_seen: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict] = field(default_factory=list)


def fingerprint(trajectory: dict, model_config: dict, data_files: list[str], eval_files: list[str],
                world_size: int) -> dict:  # fmt: skip
    """What a resumed run must share with the checkpoint to continue the same loss trajectory."""
    return {
        "settings": trajectory,
        "model": _digest(json.dumps(model_config, sort_keys=True, default=str).encode()),
        "data": _files_digest(data_files),
        "eval_data": _files_digest(eval_files),
        "world_size": world_size,
    }


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _files_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def check_fingerprint(saved: dict, current: dict, where: Path) -> None:
    """Raise a SlimlmError naming every difference between a checkpoint's run and this one."""
    diffs = []
    old, new = saved.get("settings", {}), current["settings"]
    # Processes x accumulation is the global batch: 2 ranks x 1 resume as 1 process x 2 (same micro-batches).
    same_batch = (
        saved.get("world_size", 1) * old.get("grad_accum", 1) == current["world_size"] * new["grad_accum"]
    )
    skip = {"world_size", "grad_accum"} if same_batch else set()
    for key in ("model", "data", "eval_data", "world_size"):
        if key in skip:
            continue
        if saved.get(key) != current.get(key):
            diffs.append({"model": "the model", "data": "the training data", "eval_data": "the eval data",
                          "world_size": f"the number of processes ({saved.get(key)} vs {current.get(key)})"}[key])  # fmt: skip
    for name in new:
        if name in LENGTH_SETTINGS:  # a run may be extended (or shortened): see Trainer._extend_schedule
            continue
        if name not in skip and old.get(name) != new[name]:
            diffs.append(
                f"--{name.replace('_', '-')} ({old.get(name)!r} in the checkpoint, {new[name]!r} now)"
            )
    if diffs:
        raise SlimlmError(
            f"cannot resume from {where}: it was trained with different settings: {'; '.join(diffs)}; "
            "rerun with the checkpoint's settings or start over with --overwrite"
        )


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()
    )


def find_resume_checkpoint(output_dir: str | Path, resume: str | bool) -> Path:
    if isinstance(resume, str):
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise SlimlmError(
                f"{path} is not a training checkpoint (no {STATE_FILE}); pass a checkpoints/step-N dir"
            )
        return path
    found = list_checkpoints(output_dir)
    if not found:
        raise SlimlmError(
            f"--resume: no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR}; start without --resume"
        )
    return found[-1]


def temporary_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def begin_save(final: Path) -> Path:
    """Create an empty temporary directory for a checkpoint (main process only)."""
    tmp = temporary_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_rng(tmp: Path, rank: int) -> None:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / f"rng_rank{rank}.pt")


def finish_save(tmp: Path, final: Path, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                scheduler_state: dict, state: TrainerState, run_fingerprint: dict) -> None:  # fmt: skip
    """Write the main process's files into `tmp` and move it to `final` (main process only)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / TRAINABLE_FILE))
    if optimizer_state is not None:  # None: the low-bit optimizers' shard files are already in tmp
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    payload = {"format_version": FORMAT_VERSION, "fingerprint": run_fingerprint, **asdict(state)}
    (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


@dataclass
class LoadedCheckpoint:
    path: Path
    state: TrainerState
    fingerprint: dict
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict[str, Any] | None


def read_checkpoint_state(path: Path) -> tuple[TrainerState, dict]:
    try:
        payload = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:  # unreadable, not JSON, or not text
        raise SlimlmError(f"{path / STATE_FILE} is unreadable ({e}); pick another checkpoint") from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise SlimlmError(
            f"{path} was written by an incompatible slimlm version; start over with --overwrite"
        )
    fp = payload.pop("fingerprint")
    payload.pop("format_version")
    return TrainerState(**payload), fp


def load_checkpoint(path: Path, rank: int, device: torch.device) -> LoadedCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state, fp = read_checkpoint_state(path)
    try:
        trainable = load_file(str(path / TRAINABLE_FILE), device=str(device))
        optimizer_file = path / "optimizer.pt"
        optimizer = (
            torch.load(optimizer_file, map_location=device, weights_only=True)
            if optimizer_file.is_file()
            else {}
        )
        scheduler = torch.load(path / "scheduler.pt", weights_only=True)
        rng_file = path / f"rng_rank{rank}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except (OSError, RuntimeError, SafetensorError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise SlimlmError(f"checkpoint {path} is incomplete or corrupt ({e}); pick another one") from None
    return LoadedCheckpoint(path, state, fp, trainable, optimizer, scheduler, rng)


def restore_rng(rng: dict[str, Any] | None) -> None:
    if rng is None:
        return
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


__all__ = [
    "CHECKPOINTS_DIR",
    "LoadedCheckpoint",
    "TrainerState",
    "check_fingerprint",
    "checkpoint_path",
    "find_resume_checkpoint",
    "fingerprint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "restore_rng",
]
