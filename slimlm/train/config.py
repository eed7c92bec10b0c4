"""`TrainConfig`: every setting of a training run, validated before anything is loaded or written."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from slimlm.errors import SlimlmError
from slimlm.train.batching import BATCHING
from slimlm.train.lora import DEFAULT_TARGETS, LoraConfig

METHODS = ("lora", "qlora", "full")
OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit", "factor4bit")
PRECISIONS = ("auto", "fp32", "bf16-mixed")
SCHEDULES = ("cosine", "linear", "constant")
STRATEGIES = ("auto", "ddp", "fsdp")

# Settings that change the loss trajectory: a resume must find them unchanged.
TRAJECTORY_FIELDS = (
    "method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "qlora_group_size", "optim", "lr",
    "weight_decay", "warmup_steps", "schedule", "min_lr_ratio", "batch_size", "grad_accum", "max_seq_len",
    "batching", "precision", "gradient_checkpointing", "max_grad_norm", "seed", "eval_fraction", "epochs",
    "max_steps", "loss_chunk_tokens",
)  # fmt: skip


@dataclass
class TrainConfig:
    """A training run. `data`: files (.jsonl / .json records or plain text); `output_dir`: where results go."""

    data: list[str]
    output_dir: str
    model: str | None = None
    eval_data: list[str] = field(default_factory=list)
    eval_fraction: float = 0.05  # held out of `data` when no eval_data is given
    method: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    qlora_group_size: int | None = None  # None: the largest of 128/64/32 dividing every projection
    optim: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: warmup_ratio of the total
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 512
    epochs: int = 1
    max_steps: int | None = None
    batching: str = "bucket"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # also evaluated before the first and after the last step
    save_every: int | None = None  # a checkpoint is always saved after the last step
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    distributed: str = "auto"
    offload_optimizer: bool = False  # optimizer states in CPU memory (FSDP: CPUOffloadPolicy) on a GPU
    overwrite: bool = False
    resume: str | bool = False  # True: the newest checkpoint in output_dir; str: a checkpoint directory
    progress: bool = True
    measure_memory: bool = True
    loss_chunk_tokens: int = 1024  # logits are computed for at most this many tokens at a time

    def __post_init__(self) -> None:
        self.data = [str(p) for p in ([self.data] if isinstance(self.data, str) else self.data)]
        self.eval_data = [
            str(p) for p in ([self.eval_data] if isinstance(self.eval_data, str) else self.eval_data)
        ]
        self.lora_targets = tuple(self.lora_targets)
        self.optim = {"factor": "factor4bit", "adamwfactor4bit": "factor4bit"}.get(self.optim, self.optim)
        if not self.data:
            raise SlimlmError(
                "no training data: pass --data FILE (.jsonl / .json conversations or plain text)"
            )
        choices = {"method": METHODS, "optim": OPTIMIZERS, "precision": PRECISIONS, "schedule": SCHEDULES,
                   "batching": BATCHING, "distributed": STRATEGIES}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                flag = "--" + name.replace("_", "-")
                raise SlimlmError(f"{flag} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("batch_size", "grad_accum", "max_seq_len", "epochs", "log_every", "loss_chunk_tokens",
                     "keep_checkpoints"):  # fmt: skip
            _positive(name, getattr(self, name))
        for name in ("max_steps", "eval_every", "save_every"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.max_seq_len < 2:
            raise SlimlmError(f"--max-seq-len must be at least 2, got {self.max_seq_len}")
        if not self.lr > 0:
            raise SlimlmError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise SlimlmError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise SlimlmError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise SlimlmError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise SlimlmError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise SlimlmError(f"--max-grad-norm must be > 0 (or omitted), got {self.max_grad_norm}")
        if self.qlora_group_size is not None and self.qlora_group_size not in (32, 64, 128):
            raise SlimlmError(f"--qlora-group-size must be 32, 64 or 128, got {self.qlora_group_size}")
        if self.offload_optimizer and self.optim == "adamw" and self.distributed != "fsdp":
            raise SlimlmError(
                "--offload-optimizer keeps low-bit states in CPU memory; use --optim adamw8bit/adamw4bit/factor4bit "
                "or --distributed fsdp"
            )
        if self.overwrite and self.resume:
            raise SlimlmError("--overwrite and --resume contradict each other; give one")
        if self.method != "full":
            LoraConfig(
                self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets
            )  # validates them
        if self.method == "full" and self.lora_targets != DEFAULT_TARGETS:
            raise SlimlmError("--lora-targets applies to --method lora/qlora, not full fine-tuning")

    def trajectory(self) -> dict:
        """The settings a resumed run must share with the checkpoint (JSON-friendly)."""
        out = {}
        for name in TRAJECTORY_FIELDS:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SlimlmError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


__all__ = ["METHODS", "OPTIMIZERS", "PRECISIONS", "SCHEDULES", "STRATEGIES", "TrainConfig"]
