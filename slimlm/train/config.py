"""`TrainConfig`: every setting of a training run, validated before anything is loaded or written."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from slimlm.errors import SlimlmError
from slimlm.formats.optimizers import ALIASES as OPTIMIZER_ALIASES
from slimlm.formats.optimizers import OPTIMIZERS
from slimlm.settings import arg
from slimlm.train.batching import BATCHING
from slimlm.train.lora import DEFAULT_TARGETS, LoraConfig

METHODS = ("lora", "qlora", "full")
PRECISIONS = ("auto", "fp32", "bf16-mixed")
SCHEDULES = ("cosine", "linear", "constant")
STRATEGIES = ("auto", "ddp", "fsdp")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


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

    data: list[str] = arg(nargs="+", help=".jsonl/.json conversations (XTuner or OpenAI style) or text files")
    output_dir: str = arg(
        names=("--output", "-o"), help="output directory (must be empty unless --overwrite / --resume)"
    )
    model: str | None = arg(
        None,
        names=("--model", "-m"),
        help="HF directory, .gguf file, or alias (default: the embedded smollm2-135m)",
    )
    eval_data: list[str] = arg(
        default_factory=list, nargs="+", help="held-out files (default: hold out --eval-fraction of --data)"
    )
    eval_fraction: float = arg(0.05, help="share of --data held out for eval (default %(default)s)")
    method: str = arg("lora", choices=METHODS, help="lora (default), qlora (4-bit base) or full")
    lora_rank: int = arg(16)
    lora_alpha: float = arg(32.0)
    lora_dropout: float = arg(0.05)
    lora_targets: tuple[str, ...] = arg(
        DEFAULT_TARGETS, type=_csv, help="comma-separated module names (default: all projections)"
    )
    qlora_group_size: int | None = arg(  # None: the largest of 128/64/32 dividing every projection
        None, help="4-bit group size: 32, 64 or 128 (default: the largest that fits)"
    )
    optim: str = arg(
        "adamw", choices=OPTIMIZERS, help="AdamW with 32-bit, 8-bit, 4-bit or 4-bit factored states"
    )
    lr: float = arg(2e-4)
    weight_decay: float = arg(0.0)
    warmup_steps: int | None = arg(None)  # None: warmup_ratio of the total
    warmup_ratio: float = arg(0.03)
    schedule: str = arg("cosine", choices=SCHEDULES)
    min_lr_ratio: float = arg(0.0)
    batch_size: int = arg(4, help="sequences per micro-batch and process")
    grad_accum: int = arg(1, help="micro-batches per optimizer step")
    max_seq_len: int = arg(512)
    epochs: int = arg(1)
    max_steps: int | None = arg(None, help="stop after this many optimizer steps")
    batching: str = arg("bucket", choices=BATCHING, help="length bucketing (default) or packing")
    precision: str = arg("auto", choices=PRECISIONS, help="auto: bf16-mixed on GPUs with bf16, fp32 on CPU")
    gradient_checkpointing: bool = arg(False, help="recompute layer activations in the backward")
    max_grad_norm: float | None = arg(1.0, help="gradient clipping (0 disables)")
    eval_every: int | None = arg(  # also evaluated before the first and after the last step
        None, help="evaluate every N steps (always before and after)"
    )
    save_every: int | None = arg(  # a checkpoint is always saved after the last step
        None, help="checkpoint every N steps (always after the last)"
    )
    keep_checkpoints: int = arg(2)
    log_every: int = arg(1)
    seed: int = arg(0)
    device: str = arg("auto", help="cpu | cuda | cuda:N | auto")
    distributed: str = arg("auto", choices=STRATEGIES, help="under torchrun: ddp (auto) or fsdp")
    offload_optimizer: bool = arg(  # optimizer states in CPU memory (FSDP: CPUOffloadPolicy) on a GPU
        False, help="keep optimizer states in CPU memory when training on a GPU (FSDP: CPUOffloadPolicy)"
    )
    overwrite: bool = arg(False, help="write into a non-empty output directory")
    resume: str | bool = arg(  # True: the newest checkpoint in output_dir; str: a checkpoint directory
        False, nargs="?", const=True, metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --output, or from the given checkpoint directory",
    )  # fmt: skip
    progress: bool = arg(
        True, names=("--quiet", "-q"), action="store_false", help="no progress bar or reports"
    )
    measure_memory: bool = arg(
        True, names=("--no-memory-tracking",), action="store_false",
        help="skip the exact tensor-memory measurement of the first steps",
    )  # fmt: skip
    loss_chunk_tokens: int = 1024  # logits are computed for at most this many tokens at a time

    def __post_init__(self) -> None:
        self.data = [str(p) for p in ([self.data] if isinstance(self.data, str) else self.data)]
        self.eval_data = [
            str(p) for p in ([self.eval_data] if isinstance(self.eval_data, str) else self.eval_data)
        ]
        self.lora_targets = tuple(self.lora_targets)
        self.optim = OPTIMIZER_ALIASES.get(self.optim, self.optim)  # old spellings (adamw4bit-factor)
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
