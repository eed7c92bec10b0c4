"""Code tables ("quantization maps") for optimizer states: sorted float32 values in [-1, 1] or (0, 1].

A state value x in a block with scale s is stored as the index of the table entry nearest to x / s.

- `dynamic_map` is Dettmers' dynamic tree type (sign, exponent in unary, linear fraction), built the way
  bitsandbytes' `create_dynamic_map` builds it. 8-bit AdamW uses the signed table for the first moment and
  the unsigned one without its zero for the second moment; `dynamic_map(True, 3, 4)` is the 4-bit "DE"
  table of Li et al. 2023.
- `zero_free_linear_map` is the 4-bit second-moment table of Li et al. 2023 ("linear", no zero):
  k / 2^bits for k = 1 .. 2^bits. A second moment that rounds to zero would turn its update into m / eps.
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic (exponent + linear fraction) table with 2**total_bits sorted float32 entries.

    Exponent i = 0 .. max_exponent_bits-1 scales the midpoints of an even split of [0.1, 1] into
    2**(i + total_bits - 1 - max_exponent_bits) bins (twice as many when unsigned, where the sign bit
    buys fraction bits), by 10**(i - max_exponent_bits + 1). Then 0 and 1 are added. Arithmetic is float32
    like bitsandbytes', so the 8-bit tables equal its `create_dynamic_map` value for value.
    """
    if not 1 <= max_exponent_bits <= total_bits - 1 or not 2 <= total_bits <= 8:
        raise SlimlmError(
            f"dynamic map needs 2 <= total_bits <= 8 and 1 <= max_exponent_bits < total_bits, "
            f"got total_bits={total_bits}, max_exponent_bits={max_exponent_bits}"
        )
    fraction_bits = total_bits - 1 - max_exponent_bits
    values: list[float] = []
    for i in range(max_exponent_bits):
        bins = 2 ** (i + fraction_bits + (0 if signed else 1))
        edges = torch.linspace(0.1, 1, bins + 1, dtype=torch.float32)
        scaled = (10.0 ** (i - max_exponent_bits + 1)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    # Codes left over when the fraction never uses all bits (fraction_bits > 0): more top-exponent values.
    extra = 2**fraction_bits - 1
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise SlimlmError(
            f"dynamic map with total_bits={total_bits}, max_exponent_bits={max_exponent_bits}, "
            f"signed={signed} has {len(values)} entries, not {2**total_bits}; choose other bit counts"
        )
    return torch.tensor(sorted(values), dtype=torch.float32)


def zero_free_linear_map(bits: int = 4) -> torch.Tensor:
    """The unsigned linear table without zero: k / 2**bits for k = 1 .. 2**bits (Li et al. 2023)."""
    levels = 2**bits
    return torch.arange(1, levels + 1, dtype=torch.float32) / levels


def linear_map_with_zero(bits: int = 4) -> torch.Tensor:
    """The unsigned linear table that includes zero: k / (2**bits - 1) for k = 0 .. 2**bits - 1.

    Kept only to reproduce the zero-point problem; no optimizer here uses it for the second moment.
    """
    levels = 2**bits
    return torch.arange(levels, dtype=torch.float32) / (levels - 1)


def signed_4bit_map() -> torch.Tensor:
    """The 4-bit signed dynamic-exponent table of Li et al. 2023 (first moment)."""
    return dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)


def signed_8bit_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic table (8-bit first moment)."""
    return dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)


def unsigned_8bit_map() -> torch.Tensor:
    """bitsandbytes' unsigned 8-bit dynamic table (256 entries, including 0)."""
    return dynamic_map(signed=False, max_exponent_bits=7, total_bits=8)


def zero_free_unsigned_8bit_map() -> torch.Tensor:
    """bitsandbytes' unsigned 8-bit dynamic table without its 0 (255 entries; 8-bit second moment).

    The zero-point problem of Li et al. 2023 hits 8 bits too: with 0 in the table, a second moment below
    ~1.6e-7 of its block's max decodes to 0 and the update becomes m / eps. The low-bit-optimizers repo's
    "nonlinear-nozero" table makes the same change (it duplicates the smallest positive entry instead).
    """
    return unsigned_8bit_map()[1:]
