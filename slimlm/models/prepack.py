"""CPU inference: linear weights prepacked once into oneDNN's blocked layout.

`F.linear` on CPU reorders a bf16 weight into oneDNN's layout on every call; for the one-token rows of
decoding that reorder costs as much as the matmul itself. Packing once at load time (what inductor's
freezing pass does) roughly doubles bf16 decode speed on this machine (benchmarks/engine_bench.py).

The packed tensor replaces the float weight (same bytes), so the model becomes inference-only; a
tied lm_head is packed as a copy, because the embedding lookup still needs the plain table.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)


class PackedLinear(nn.Module):
    """Inference-only nn.Linear over a oneDNN-packed weight; same outputs as F.linear up to summation order."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        self.register_buffer(
            "packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False
        )
        self.packed_bytes = weight.numel() * weight.element_size()
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def fuse(cls, linears: list[nn.Linear]) -> PackedLinear:
        """One packed matmul for several linears that read the same input (outputs concatenated)."""
        biases = [lin.bias for lin in linears]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        return cls(torch.cat([lin.weight.detach() for lin in linears]), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed_weight, self.bias,
                                               "none", [], "")  # fmt: skip
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, onednn-packed"


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


# Linears that read the same input, fused into one matmul: (module attribute, its parts).
FUSIONS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


def prepack_linears(model: nn.Module, include_lm_head: bool = True) -> int:
    """Swap every plain nn.Linear of `model` for a PackedLinear in place; returns how many were swapped.

    q/k/v and gate/up become one fused matmul each where the module has a slot for it (the Llama
    family's `qkv_proj` / `gate_up_proj`). Quantized linears (QuantLinear) are left alone: they already
    run on their own kernels.
    """
    if not can_prepack(model):
        return 0
    swapped = 0
    for module in list(model.modules()):
        for fused_name, part_names in FUSIONS:
            parts = [getattr(module, p, None) for p in part_names]
            if fused_name in vars(module) and all(type(p) is nn.Linear for p in parts):
                setattr(module, fused_name, PackedLinear.fuse(parts))
                for p in part_names:
                    delattr(module, p)
                swapped += len(parts)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or (name == "lm_head" and not include_lm_head):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(module.weight, module.bias))
        swapped += 1
    return swapped


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by packed weights (oneDNN tensors do not report storage the usual way)."""
    return sum(m.packed_bytes for m in model.modules() if isinstance(m, PackedLinear))
