"""LoRA: wrap a frozen projection (nn.Linear or a quantized QuantLinear) with a trainable low-rank update.

    y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r

`lora_A` [r, in] starts Kaiming-uniform and `lora_B` [out, r] at zero (PEFT's defaults), so a fresh
adapter leaves the model unchanged. Module and parameter names follow PEFT (`q_proj.lora_A.weight`), so
an adapter's state dict maps one to one onto PEFT's file format.

Quantized bases (QLoRA): kernels such as int4 tinygemm have no autograd formula, and dequantizing
inside autograd would keep a float copy of every weight alive for the backward. `_FrozenQuantLinear`
runs the kernel forward and computes only the input gradient, dequantizing one weight at a time; every
quantized projection of the model gets it, since gradients must pass through the ones without adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.errors import SlimlmError

# Every projection of every family: Phi-3 stores q/k/v and gate/up fused (qkv_proj, gate_up_proj), as
# HF and PEFT name them. With these defaults a name the model lacks is skipped; named explicitly, it is
# an error.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "qkv_proj", "gate_up_proj")  # fmt: skip


@dataclass
class LoraConfig:
    """rank r, scaling alpha / r, dropout on the adapter's input, and the module names to adapt.

    `target_modules` are matched like PEFT: a module whose full name equals a target or ends with
    "." + target.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise SlimlmError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise SlimlmError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SlimlmError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise SlimlmError("LoRA needs at least one target module, e.g. q_proj,v_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class _FrozenQuantLinear(torch.autograd.Function):
    """y = base(x) for a frozen quantized base; backward gives dL/dx = dL/dy · W only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        with torch.no_grad():
            return type(base).forward(base, x)  # the class's kernel forward, not the instance patch

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.base.dequantized_weight(grad_out.dtype)  # [out, in], original column order
        return grad_out @ weight, None


def make_quantized_differentiable(model: nn.Module) -> int:
    """Let gradients flow through every frozen quantized linear of `model` (adapted or not), in place.

    The instance's forward is replaced (names and state dict unchanged); returns how many were patched.
    """
    count = 0
    for module in model.modules():
        if is_quantized(module) and "forward" not in vars(module):

            def forward(x: torch.Tensor, _base=module) -> torch.Tensor:
                if torch.is_grad_enabled() and x.requires_grad:
                    return _FrozenQuantLinear.apply(x, _base)
                return type(_base).forward(_base, x)

            module.forward = forward
            count += 1
    return count


def is_quantized(module: nn.Module) -> bool:
    """A quantized linear: exposes its float weight through `dequantized_weight` instead of `.weight`."""
    return hasattr(module, "dequantized_weight") and not isinstance(module, nn.Linear)


class LoraLinear(nn.Module):
    """A frozen `base_layer` (anything with in_features/out_features and a forward) plus lora_A, lora_B."""

    def __init__(self, base_layer: nn.Module, config: LoraConfig, name: str = "") -> None:
        super().__init__()
        in_f, out_f = getattr(base_layer, "in_features", None), getattr(base_layer, "out_features", None)
        if not isinstance(in_f, int) or not isinstance(out_f, int):
            raise SlimlmError(
                f"cannot put LoRA on {name or type(base_layer).__name__}: it has no in/out features"
            )
        if config.rank > min(in_f, out_f):
            raise SlimlmError(
                f"LoRA rank {config.rank} is larger than {name} allows ({out_f}x{in_f}: at most {min(in_f, out_f)}); "
                "pick a smaller --lora-rank"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.scaling = config.rank, config.scaling
        self.quantized_base = is_quantized(base_layer)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        device = next(iter(base_layer.buffers()), next(iter(base_layer.parameters()), None))
        device = device.device if device is not None else None
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_f, config.rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(config.rank, out_f, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        a = self.lora_A.weight
        update = F.linear(F.linear(self.lora_dropout(x).to(_compute_dtype(x, a)), a), self.lora_B.weight)
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The float32 update [out, in] this adapter adds to the base weight: B @ A * scaling."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, quantized_base={self.quantized_base}"


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # Under autocast F.linear picks the dtype itself; outside it, run the adapter in its own precision.
    return x.dtype if torch.is_autocast_enabled(x.device.type) else weight.dtype


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_quantized(module)


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze every parameter of `model` and wrap each target projection in a `LoraLinear`, in place.

    Quantized projections, adapted or not, get a backward for their input (`make_quantized_differentiable`).
    Returns the names of the wrapped modules. Raises SlimlmError for targets that match nothing.
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise SlimlmError("the model already has LoRA adapters; load a fresh base model")
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = {name: m for name, m in model.named_modules() if name and _adaptable(m)}
    unmatched = [t for t in config.target_modules if not any(_matches(n, (t,)) for n in candidates)]
    if set(config.target_modules) == set(DEFAULT_TARGETS) and len(unmatched) < len(DEFAULT_TARGETS):
        unmatched = []  # the defaults name every family's projections; this model has some of them
    if unmatched:
        known = sorted(
            {n.rsplit(".", 1)[-1] for n in candidates if ".layers." in n or n.startswith("layers.")}
        )
        raise SlimlmError(
            f"LoRA target module(s) {', '.join(unmatched)} do not exist in this model; "
            f"choose from {', '.join(known)}"
        )
    make_quantized_differentiable(model)
    wrapped = []
    for name, module in candidates.items():
        if not _matches(name, config.target_modules):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, config, name))
        wrapped.append(name)
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, keyed like `model.layers.0.self_attn.q_proj.lora_A.weight`."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter weights into the LoraLinear modules of `model`; every adapter must be covered exactly."""
    expected = {k: v for k, v in lora_state_dict(model).items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        detail = f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}"
        raise SlimlmError(
            f"{source} does not fit this model's LoRA layout ({detail}); was it made for another model?"
        )
    with torch.no_grad():
        for key, target in expected.items():
            value = state[key]
            if tuple(value.shape) != tuple(target.shape):
                raise SlimlmError(
                    f"{source}: {key} has shape {tuple(value.shape)} but this model needs {tuple(target.shape)} "
                    "(another rank or model?)"
                )
            target.copy_(value)


def dequantize_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A float nn.Linear holding the weight a quantized linear multiplies by."""
    weight = module.dequantized_weight(torch.float32)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear.to(dtype)


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Fold every adapter into its base weight (quantized bases are dequantized first); returns the count.

    The merge is computed in float32 and stored in `dtype` (default: the base weight's dtype, float32 for
    quantized bases).
    """
    merged = 0
    for name, module in lora_modules(model).items():
        base = module.base_layer
        if module.quantized_base:
            base = dequantize_linear(base, torch.float32)
        target_dtype = dtype or base.weight.dtype
        weight = base.weight.float() + module.delta_weight().to(base.weight.device)
        linear = nn.Linear(
            module.in_features, module.out_features, bias=base.bias is not None, device=weight.device
        )
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear.to(target_dtype))
        merged += 1
    return merged


__all__ = [
    "DEFAULT_TARGETS",
    "LoraConfig",
    "LoraLinear",
    "apply_lora",
    "dequantize_linear",
    "is_quantized",
    "load_lora_state_dict",
    "lora_modules",
    "lora_state_dict",
    "make_quantized_differentiable",
    "merge_lora",
]
