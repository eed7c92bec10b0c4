"""Group parameters the C kernel can hold at 2 bytes: d and m = −z·d of every group exact in fp16.

The kernel's layout (kernels/qweights.py `pack`) stores each group's scale d and minimum m as fp16 where
every value of a tensor survives fp16 exactly, else as float32: 8 bytes per group instead of 4, which is
6% of an int8 g64 weight's bytes and 11% of an int4 g64 one's, read on every decode step. So every
quantizer here rounds its grid onto fp16 first and then quantizes the codes against the rounded grid, as
GGUF's Q4_1 / Q8_0 store fp16 d and m. The codes absorb the rounding; what moves is the grid's step, by
less than one unit in the last kept bit (2^-10 relative for symmetric grids, 2^-6 for 4-bit integer
zero points): each group takes whichever neighbour gives the smaller squared error (`rounded_group_scale`).

- Symmetric (z = 2^(bits-1), a power of two): d on fp16's grid; m = −z·d is then exact too.
- Integer zero points z ≤ 2^bits − 1 (asymmetric): m = −z·d has up to (bits of d) + bits significant
  bits, and fp16 keeps 11, so d keeps 11 − bits (7 at 4 bits). At 8 bits that would leave 3: such grids
  (never made by `slimlm quantize`, whose 8 bits are symmetric) keep float32.
- Per-channel grids (`--group-size -1`, and the 8-bit table beside 4-bit weights) are left as they are:
  PyTorch's int8 module holds their scales as bf16 (fp16-exact, m = −128·d too), and the recommended w4
  recipe's answers (tests/test_kv_answers.py) were measured with that table as it was.
- Float zero points (w = d·q + m, z = −m / d) are left as they are: PyTorch's int4 modules, which the
  checkpoint is written from, keep them as bf16 (scale, minimum) pairs, and m = −z·d of those is not
  fp16-exact; such checkpoints keep float32 (d, m) in the kernel.
"""

from __future__ import annotations

import torch

FP16_SIGNIFICANT_BITS = 11
FP16_MIN_EXPONENT = -24  # fp16's smallest subnormal is 2^-24: every fp16 value is a multiple of it
FP16_MAX = 65504.0
SCALE_CHUNK_ELEMENTS = 2**18  # weights per chunk of rounded_group_scale: 1 MiB of float32 temporaries


ROUNDED_GROUPS = (32, 64, 128)  # per-channel grids (a group spanning the row) are left as they are


def scale_bits_for(bits: int, sym: bool, group: int = 64) -> int | None:
    """Significant bits a scale may keep so that d and −z·d are fp16-exact; None: leave it (too few bits
    to bother, or a per-channel grid)."""
    if group not in ROUNDED_GROUPS:
        return None
    if sym:
        return FP16_SIGNIFICANT_BITS
    keep = FP16_SIGNIFICANT_BITS - bits
    return keep if keep >= 7 else None


def round_significant(x: torch.Tensor, keep: int, mode: str = "nearest") -> torch.Tensor:
    """x (positive float32) rounded with `keep` significant bits, on fp16's grid (multiples of 2^-24, at
    most 65504): to nearest, "up" or "down"; never 0."""
    x = x.float().clamp(max=FP16_MAX)
    _, exp = torch.frexp(x)  # x = mantissa · 2^exp, mantissa in [0.5, 1)
    quantum = torch.ldexp(torch.ones_like(x), (exp - keep).clamp(min=FP16_MIN_EXPONENT))
    # up / down: a scale a float rounding off a grid point (a grid already on fp16) stays on it
    if mode == "up":
        out = torch.ceil(x / quantum * (1 - 2.0**-20)) * quantum
    elif mode == "down":
        out = torch.floor(x / quantum * (1 + 2.0**-20)) * quantum
    else:
        out = torch.round(x / quantum) * quantum
    return torch.where(out > 0, out, quantum).clamp(max=FP16_MAX)


def rounded_group_scale(
    w: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, sym: bool, keep: int
) -> torch.Tensor:
    """The integer-zero grid's scale for groups w [..., n] (minimum lo, min/max scale `scale`) rounded to
    `keep` significant bits: of the two neighbours, the one whose grid (zero point re-taken on it) has
    the smaller squared rounding error. Measured on SmolLM2's linears at 4 bits g64: always rounding up
    costs +1.1% squared error over float32 scales, to nearest +0.03%, the better neighbour -1.6%."""
    maxq = 2**bits - 1
    n = w.shape[-1]
    flat_w, flat_lo, flat_scale = w.reshape(-1, n), lo.reshape(-1), scale.reshape(-1)
    out = torch.empty(flat_scale.shape, dtype=torch.float32, device=scale.device)
    # Groups a chunk at a time: each group's choice is its own, so the result is the same, and ~1 MiB
    # temporaries stay in cache where whole-tensor ones all went through memory (what this saves:
    # docs/engine.md, "A model where the weights dominate").
    rows = max(1, SCALE_CHUNK_ELEMENTS // n)
    for i in range(0, flat_scale.shape[0], rows):
        part = slice(i, i + rows)
        out[part] = _better_neighbour(
            flat_w[part].float(), flat_lo[part], flat_scale[part], bits, sym, keep, maxq
        )
    return out.view(scale.shape)


def _better_neighbour(
    w: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, sym: bool, keep: int, maxq: int
) -> torch.Tensor:
    def error(s: torch.Tensor) -> torch.Tensor:
        z = torch.full_like(s, 2 ** (bits - 1)) if sym else torch.round(-lo / s).clamp(0, maxq)
        q = torch.clamp(torch.round(w / s.unsqueeze(-1) + z.unsqueeze(-1)), 0, maxq)
        return ((q - z.unsqueeze(-1)) * s.unsqueeze(-1) - w).pow(2).sum(-1)

    up, down = round_significant(scale, keep, "up"), round_significant(scale, keep, "down")
    return torch.where(error(down) < error(up), down, up)


def is_fp16_exact(t: torch.Tensor) -> bool:
    """Every value of t survives a round trip through fp16 (what `pack` checks before storing fp16)."""
    t = t.float()
    half = t.to(torch.float16)
    return bool(torch.isfinite(half).all()) and torch.equal(half.float(), t)
