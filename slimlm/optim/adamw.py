"""AdamW with low-bit states: a drop-in for torch.optim.AdamW whose subclasses choose how moments are stored.

The update is torch's AdamW (decoupled weight decay, bias correction, eps outside the sqrt), computed in
float32 for every parameter dtype. Each step decodes a parameter's moments to float32, updates them and the
parameter from the unrounded values, then stores them back in low bit. Tensors of at most
`fp32_state_max_numel` elements keep float32 moments, where the arithmetic is exactly torch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.optimizers import BLOCK_4BIT, FP32_STATE_MAX_NUMEL
from slimlm.optim.codecs import Layout, MomentCodec
from slimlm.optim.sharding import local_tensor

STATE_FORMAT_VERSION = 1
HEADER_KEY = "slimlm_optimizer"
SUPPORTED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LowBitAdamW(torch.optim.Optimizer):
    """Base class: subclasses define `default_block_size` and `moment_codecs(p)`.

    Parameters may be FSDP2 DTensor shards: each rank stores and updates the moments of its local shard
    (see slimlm.optim.sharding), and `moment_codecs` decides by the global shape, the same on every rank.
    """

    default_block_size = BLOCK_4BIT

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        block_size: int | None = None,
        fp32_state_max_numel: int = FP32_STATE_MAX_NUMEL,
        state_device: str | torch.device | None = None,
    ) -> None:
        name = type(self).__name__
        unsupported = {"amsgrad": amsgrad, "capturable": capturable, "differentiable": differentiable}
        unsupported["fused"] = bool(fused)
        for option, value in unsupported.items():
            if value:
                raise SlimlmError(f"{name} does not support {option}=True; leave it at its default")
        del foreach  # a speed hint for torch's own kernels; every setting gives the same result here
        _check_hyperparameters(name, lr, betas, eps, weight_decay)
        block_size = self.default_block_size if block_size is None else block_size
        if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
            raise SlimlmError(f"{name}: block_size must be an even integer >= 2, got {block_size!r}")
        if not isinstance(fp32_state_max_numel, int) or fp32_state_max_numel < 0:
            raise SlimlmError(
                f"{name}: fp32_state_max_numel must be an integer >= 0, got {fp32_state_max_numel!r}"
            )
        self.block_size = block_size
        self.fp32_state_max_numel = fp32_state_max_numel
        # Offload: states live here (e.g. "cpu") and visit the parameter's device for its update only.
        self.state_device = None if state_device is None else torch.device(state_device)
        params = list(params)
        if not params:
            raise SlimlmError(f"{name} got an empty parameter list; pass model.parameters() or param groups")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False)
        defaults["maximize"] = maximize
        super().__init__(params, defaults)

    # -- what subclasses define -------------------------------------------------------------------------

    def moment_codecs(self, p: torch.Tensor) -> tuple[MomentCodec, MomentCodec]:
        """(first-moment codec, second-moment codec) for parameter p (global shape; a DTensor stays one)."""
        raise NotImplementedError

    def keeps_fp32_state(self, p: torch.Tensor) -> bool:
        return p.numel() <= self.fp32_state_max_numel

    # -- torch.optim.Optimizer API ----------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            _check_param(type(self).__name__, p)
        group = {**param_group, "params": params}
        if "betas" in group or "lr" in group or "eps" in group or "weight_decay" in group:
            _check_hyperparameters(
                type(self).__name__,
                group.get("lr", self.defaults["lr"]),
                group.get("betas", self.defaults["betas"]),
                group.get("eps", self.defaults["eps"]),
                group.get("weight_decay", self.defaults["weight_decay"]),
            )
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step for every parameter with a gradient; returns closure()'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise SlimlmError(f"{name} does not support sparse gradients; use dense embeddings")
                state = self.state[p]
                m_codec, v_codec = self.moment_codecs(p)
                local = local_tensor(p)  # an FSDP2 shard's local rows; p itself otherwise
                if not state:
                    state["step"] = torch.tensor(0.0)
                    m_codec.init(state, local)
                    v_codec.init(state, local)
                state["step"] += 1
                offloaded = self.state_device is not None and self.state_device != local.device
                if offloaded:
                    home, state = (
                        state,
                        {k: v if k == "step" else v.to(local.device) for k, v in state.items()},
                    )
                adamw_update_(
                    local,
                    local_tensor(p.grad),
                    state,
                    m_codec,
                    v_codec,
                    lr=lr,
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=float(state["step"]),
                    maximize=group["maximize"],
                )
                if offloaded:
                    home.update({k: v.to(self.state_device) for k, v in state.items()})
        return loss

    def state_device_for(self, p: torch.Tensor) -> torch.device:
        """Where p's states are kept: the offload device if one is set, else the (local) parameter's."""
        return self.state_device or local_tensor(p).device

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict (plain tensors) plus a header naming the format and layout."""
        out = super().state_dict()
        out[HEADER_KEY] = self._header()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by the same optimizer class and settings; tensors are restored bit-exactly."""
        header = state_dict.get(HEADER_KEY)
        expected = self._header()
        name = type(self).__name__
        if header is None:
            raise SlimlmError(f"this optimizer state was not saved by slimlm's {name}; start without it")
        if header.get("format_version") != STATE_FORMAT_VERSION:
            raise SlimlmError(
                f"optimizer state format {header.get('format_version')} is not the supported "
                f"{STATE_FORMAT_VERSION}; save it again with this slimlm version"
            )
        if header != expected:
            raise SlimlmError(
                f"optimizer state was saved by {header} but this is {expected}; construct a matching optimizer"
            )
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise SlimlmError(
                f"{name}: the saved state has other parameter groups or sizes than this optimizer"
            )
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, (saved_id, p) in enumerate(zip(saved_ids, params, strict=True)):
            if saved_id in state_dict["state"]:
                self._check_layout(index, p, state_dict["state"][saved_id])
        super().load_state_dict({"state": state_dict["state"], "param_groups": saved_groups})
        # torch casts floating state to the parameter dtype; ours stays exactly as saved (fp32 scales, codes).
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                self.state[p] = {
                    key: value.to(self.state_device_for(p) if key != "step" else value.device, copy=True)
                    for key, value in saved.items()
                }

    # -- internals --------------------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {
            "format_version": STATE_FORMAT_VERSION,
            "optimizer": type(self).__name__,
            "block_size": self.block_size,
            "fp32_state_max_numel": self.fp32_state_max_numel,
        }

    def expected_layout(self, p: torch.Tensor) -> Layout:
        m_codec, v_codec = self.moment_codecs(p)
        local = local_tensor(p)
        return {"step": ((), torch.float32), **m_codec.layout(local), **v_codec.layout(local)}

    def _check_layout(self, index: int, p: torch.Tensor, saved: dict[str, Any]) -> None:
        expected = self.expected_layout(p)
        got = {
            key: (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else type(value)
            for key, value in saved.items()
        }
        if got != expected:
            raise SlimlmError(
                f"saved optimizer state of parameter #{index} (shape {tuple(p.shape)}) does not fit: "
                f"expected {expected}, got {got}; was it saved for another model?"
            )


def adamw_update_(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    m_codec: MomentCodec,
    v_codec: MomentCodec,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool,
) -> None:
    """torch's single-tensor AdamW step on p, with moments read and written through the codecs."""
    work = p if p.dtype == torch.float32 else p.float()
    g = grad if grad.dtype == torch.float32 else grad.float()
    if maximize:
        g = -g
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    m = m_codec.decode(state, p)
    m.lerp_(g, 1 - beta1)
    v = v_codec.ema_square(state, p, g, beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    work.addcdiv_(m, denom, value=-(lr / bias_correction1))
    if work is not p:
        p.copy_(work)
    m_codec.encode(state, p, m)
    v_codec.encode(state, p, v)


def _check_param(name: str, p: torch.Tensor) -> None:
    if not isinstance(p, torch.Tensor):
        raise SlimlmError(f"{name} optimizes tensors, got {type(p).__name__}; pass model.parameters()")
    if p.dtype not in SUPPORTED_PARAM_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_PARAM_DTYPES)
        raise SlimlmError(
            f"{name} supports parameters of dtype {supported}, got {str(p.dtype).removeprefix('torch.')} "
            f"(shape {tuple(p.shape)}); convert the model, e.g. model.float()"
        )
    if p.is_sparse:
        raise SlimlmError(f"{name} does not support sparse parameters (shape {tuple(p.shape)})")


def _check_hyperparameters(name: str, lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise SlimlmError(f"{name}: a Tensor lr must hold one element, got shape {tuple(lr.shape)}")
    if not float(lr) >= 0.0 or not math.isfinite(float(lr)):
        raise SlimlmError(f"{name}: lr must be a finite number >= 0, got {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise SlimlmError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= float(beta) < 1.0:
            raise SlimlmError(f"{name}: betas[{i}] must be in [0, 1), got {beta}")
    if not float(eps) >= 0.0:
        raise SlimlmError(f"{name}: eps must be >= 0, got {eps}")
    if not float(weight_decay) >= 0.0:
        raise SlimlmError(f"{name}: weight_decay must be >= 0, got {weight_decay}")
