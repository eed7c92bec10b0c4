"""Run real training steps and measure their tensor-memory peak with `TensorMemoryTracker`.

The step is the one the planner models: HF-style causal LM (`model(input_ids=, labels=).loss`), the loss
output dropped before the backward (as HF's Trainer does), `zero_grad(set_to_none=True)`, no gradient
clipping. Precisions: fp32; bf16 (pure: weights, gradients and torch's optimizer states in bf16); mixed
(bf16 weights and gradients, fp32 master copies held by the optimizer; before the step every gradient is
copied to fp32 and the bf16 one dropped, after it the bf16 weights are refreshed in place). LoRA is a
minimal wrapper (A·dropout(x) then B, as slimlm's and PEFT's) around the frozen projections. The peak is taken over the last
of `steps` steps, so optimizer states exist (steady state), as in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.plan.measure import TensorMemoryTracker, tensors_of_optimizer
from slimlm.plan.training import TrainingSettings


class LoRALinear(nn.Module):
    """y = base(x) + (x Aᵀ) Bᵀ · alpha / r with the base frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # as slimlm.train.lora and PEFT
        base.weight.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, dtype=w.dtype) / rank)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype))
        self.scaling = (alpha or rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


def add_lora(model: nn.Module, rank: int, targets: tuple[str, ...], dropout: float = 0.0) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, dropout=dropout))


def make_optimizer(params: list[torch.Tensor], s: TrainingSettings) -> torch.optim.Optimizer:
    foreach = bool(s.foreach)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=foreach)
    from slimlm.optim import variants

    cls = {
        "adamw8bit": variants.AdamW8bit,
        "adamw4bit": variants.AdamW4bit,
        "factor4bit": variants.AdamWFactor4bit,
    }
    return cls[s.optimizer](params, lr=1e-4)


def drop_cached_tables() -> None:
    """slimlm.optim's code tables cache lookup tensors once per process and device. Dropping them before a
    measurement makes the optimizer rebuild the ones it uses under the tracker, so the measured peak
    does not depend on which optimizers ran earlier in the process."""
    try:
        from slimlm.optim import variants
    except ImportError:
        return
    for table in vars(variants).values():
        cache = getattr(table, "_per_device", None)
        if isinstance(cache, dict):
            cache.clear()


@dataclass
class MeasuredStep:
    peak_bytes: int  # tensor bytes, peak over the measured step
    start_bytes: int  # live tensor bytes when the measured step began (weights, states)


def measure_training_step(
    model: nn.Module, s: TrainingSettings, vocab_size: int, steps: int = 2, seed: int = 0
) -> MeasuredStep:
    """Prepare `model` (an HF causal LM) for `s` in place, run `steps` steps, return the last step's peak."""
    if s.method == "qlora":
        raise ValueError("QLoRA steps are not measured here")
    model.to(torch.float32 if s.precision == "fp32" else torch.bfloat16)
    if not s.flash_attention:
        model.set_attn_implementation("eager")
    if s.method == "lora":
        add_lora(model, s.lora_rank, s.lora_targets, s.lora_dropout)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float() for p in trainable] if s.precision == "mixed" else None
    optimizer = make_optimizer(masters if masters is not None else trainable, s)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (s.micro_batch, s.seq_len), generator=gen)

    drop_cached_tables()
    tracker = TensorMemoryTracker()
    tracker.track_existing([*model.parameters(), *model.buffers(), *(masters or []), ids])
    start = 0
    with tracker:
        for step in range(steps):
            if step == steps - 1:
                tracker.reset_peak()
                start = tracker.current
            for _ in range(s.grad_accumulation):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                del loss
            _step(optimizer, trainable, masters)
    return MeasuredStep(tracker.peak, start)


@torch.no_grad()
def _step(
    optimizer: torch.optim.Optimizer, trainable: list[torch.Tensor], masters: list[torch.Tensor] | None
) -> None:
    if masters is None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    for p, m in zip(trainable, masters, strict=True):
        m.grad = p.grad.float()
        p.grad = None
    optimizer.step()
    for p, m in zip(trainable, masters, strict=True):
        p.copy_(m)
        m.grad = None


__all__ = ["LoRALinear", "MeasuredStep", "add_lora", "measure_training_step", "tensors_of_optimizer"]
