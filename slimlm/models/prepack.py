"""CPU inference: how the linear weights are laid out, chosen by how many tokens a step has.

Two kernels matter on CPU, and each wins at one end (benchmarks/decode_kernels.py):

- oneDNN on weights prepacked once into its blocked layout (what inductor's freezing pass does). Best
  for steps with several rows (batched decode, prefill); `F.linear` without packing reorders a bf16
  weight on every call, which costs as much as the matmul itself.
- torch's own bf16/fp16 GEMV, on plain row-major weights, with oneDNN switched off for the step (the
  runner does that for one-token steps). It streams weights faster than oneDNN at one row, and is
  many times slower than it at two rows or more (docs/measured_choices.md).

Layouts (`weights_layout`): "packed" (oneDNN only), "plain" (plain weights, fused q/k/v and gate/up),
"both" (the two copies: each step takes its faster kernel, at the price of the linear weights twice).
Packing makes the model inference-only; a tied lm_head stays plain, because the embedding lookup
needs the plain table and a packed copy would add 21% to SmolLM2's weights.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.heap import release_free_heap

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)
WEIGHTS_LAYOUTS = ("auto", "packed", "plain", "both")


class PackedLinear(nn.Module):
    """Inference-only nn.Linear over a oneDNN-packed weight; same outputs as F.linear up to summation order."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, keep_plain: bool = False
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        self.register_buffer(
            "packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False
        )
        self.packed_bytes = weight.numel() * weight.element_size()
        # "both" layout: the plain copy serves one-token steps through torch's GEMV (see module doc).
        self.register_buffer("plain_weight", weight if keep_plain else None, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain_weight is not None and x.numel() == self.in_features:
            return F.linear(x, self.plain_weight, self.bias)
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed_weight, self.bias,
                                               "none", [], "")  # fmt: skip
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        plain = " + plain copy" if self.plain_weight is not None else ""
        return f"in={self.in_features}, out={self.out_features}, onednn-packed{plain}"


def _concat(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of linears that read the same input, stacked: one matmul for all."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = linears[0].bias is not None
    return weight, torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


@contextlib.contextmanager
def onednn_disabled():
    """Route this block's bf16/fp16 matmuls to torch's own kernels (GEMV for one row) instead of oneDNN.

    Explicit oneDNN ops (PackedLinear) are unaffected. The private switch is what
    `torch.backends.mkldnn.flags` flips, without that helper's TF32 warning on every call.
    """
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


@functools.cache
def prepack_available() -> bool:
    """The packing ops exist in CPU builds with oneDNN; probe once."""
    try:
        w = torch.zeros(16, 32, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        torch.ops.mkldnn._linear_pointwise(
            torch.zeros(1, 32, dtype=torch.bfloat16), packed, None, "none", [], ""
        )
        return torch.backends.mkldnn.is_available()
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def can_prepack(model: nn.Module) -> bool:
    param = next(model.parameters())
    return param.device.type == "cpu" and param.dtype in PACKABLE_DTYPES and prepack_available()


def check_weights_layout(layout: str, allow_auto: bool = True) -> None:
    choices = WEIGHTS_LAYOUTS if allow_auto else WEIGHTS_LAYOUTS[1:]
    if layout not in choices:
        raise SlimlmError(f"unknown weights layout {layout!r}; choose one of {', '.join(choices)}")


# Linears that read the same input, fused into one matmul: (module attribute, its parts).
FUSIONS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


def prepare_linears(model: nn.Module, layout: str, include_lm_head: bool = True) -> int:
    """Lay out every plain nn.Linear of `model` for CPU inference, in place; returns how many were changed.

    q/k/v and gate/up become one matmul each wherever the module has a slot for it (the Llama family's
    `qkv_proj` / `gate_up_proj`), in every layout. Quantized linears (QuantLinear) are left alone: they
    run on their own kernels. Where oneDNN packing is unavailable (GPU, fp16, builds without it),
    "packed" and "both" fall back to "plain".
    """
    check_weights_layout(layout, allow_auto=False)  # "auto" is resolved by the caller, who knows the batch
    pack = layout != "plain" and can_prepack(model)
    keep_plain = layout == "both"

    def convert(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return PackedLinear(weight, bias, keep_plain) if pack else _plain_linear(weight, bias)

    changed = 0
    # Only the modules with a fused slot (attention, MLP): a list of every module would keep the parts
    # alive to the end, all of them beside their fused copies.
    owners = [m for m in model.modules() if any(fused in vars(m) for fused, _ in FUSIONS)]
    for module in owners:
        for fused_name, part_names in FUSIONS:
            parts = [getattr(module, p, None) for p in part_names]
            if fused_name in vars(module) and all(type(p) is nn.Linear for p in parts):
                setattr(module, fused_name, convert(*_concat(parts)))
                for p in part_names:
                    delattr(module, p)
                changed += len(parts)
                del parts
                # The parts' storage is freed below the fused copies, where glibc keeps it resident:
                # hand it back now, so the load's peak is about one fusion above the final size, not
                # all the parts twice (slimlm/heap.py).
                release_free_heap()
    if not pack:
        return changed
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and (name != "lm_head" or include_lm_head)]  # fmt: skip
    for name in names:  # by name: a list of the modules would keep every replaced weight alive
        module = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent,
            child,
            convert(module.weight.detach(), None if module.bias is None else module.bias.detach()),
        )
        changed += 1
        del module
        release_free_heap()  # the plain weight just freed (as above)
    return changed


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by packed weights (oneDNN tensors do not report storage the usual way)."""
    return sum(m.packed_bytes for m in model.modules() if isinstance(m, PackedLinear))
