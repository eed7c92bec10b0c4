"""Rotary position embeddings with linear, dynamic NTK-aware and Llama-3 style scaling.

The frequency math mirrors HF transformers' `modeling_rope_utils` (fp32 throughout) so that logits match.
"""

from __future__ import annotations

import math

import torch

from slimlm.config import ModelConfig
from slimlm.errors import SlimlmError


def base_inv_freq(dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def llama3_inv_freq(
    inv_freq: torch.Tensor, factor: float, low: float, high: float, orig_len: int
) -> torch.Tensor:
    """Llama-3.1 scaling: long wavelengths divided by `factor`, short kept, a smooth band between."""
    low_wavelen = orig_len / low
    high_wavelen = orig_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (orig_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin for explicit positions; applies them in the HF "rotate half" layout."""

    def __init__(
        self, config: ModelConfig, device: torch.device | str | None = None, local: bool = False
    ) -> None:
        """`local`: the RoPE of Gemma 3's sliding layers (their own base, no scaling)."""
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
        self.scaling = None if local else config.rope_scaling
        self.max_position_embeddings = config.max_position_embeddings
        self.attention_factor = 1.0
        target = torch.device(device) if device is not None else torch.get_default_device()
        if target.type == "meta":
            # Shape only: build_model recomputes the buffer on the real device, and math on meta tensors
            # goes through torch._refs, whose first call imports torch._dynamo (~1.5 s).
            self.register_buffer("inv_freq", torch.empty(self.dim // 2, device="meta"), persistent=False)
            return
        inv_freq = base_inv_freq(self.dim, self.base, device)
        if self.scaling is not None:
            kind = self.scaling.rope_type
            if kind == "linear":
                inv_freq = inv_freq / self.scaling.factor
            elif kind == "longrope":  # Phi-3: per-frequency divisors, short or long by sequence length
                exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
                powers = self.base**exponents
                factors = (self.scaling.short_factor, self.scaling.long_factor)
                if any(len(f) != self.dim // 2 for f in factors):
                    raise SlimlmError(
                        f"longrope short/long factors need head_dim / 2 = {self.dim // 2} values"
                    )
                short, long = (
                    1.0 / (torch.tensor(f, dtype=torch.float32, device=device) * powers) for f in factors
                )
                self.register_buffer("long_inv_freq", long, persistent=False)
                inv_freq, self.attention_factor = short, self.scaling.attention_factor
            elif kind == "llama3":
                orig = self.scaling.original_max_position_embeddings or self.max_position_embeddings
                inv_freq = llama3_inv_freq(
                    inv_freq,
                    self.scaling.factor,
                    self.scaling.low_freq_factor,
                    self.scaling.high_freq_factor,
                    orig,
                )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _dynamic_inv_freq(self, seq_len: torch.Tensor) -> torch.Tensor:
        """NTK-aware base growth past the trained length; seq_len: [N] -> inv_freq [N, dim/2]."""
        orig = self.scaling.original_max_position_embeddings or self.max_position_embeddings
        factor = self.scaling.factor
        seq_len = torch.clamp(seq_len.to(torch.float32), min=orig)
        base = self.base * ((factor * seq_len / orig) - (factor - 1)) ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=seq_len.device).float() / self.dim
        inv = 1.0 / (base[:, None] ** exponents[None, :])
        # Within the trained length HF keeps the unscaled frequencies exactly.
        within = (seq_len <= orig)[:, None]
        return torch.where(within, self.inv_freq[None, :].to(inv.device), inv)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, scale_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> (cos, signed sin) each [T, head_dim] in `dtype` (see apply_rotary).

        scale_lens ([T], dynamic scaling only) is the sequence length that sets each token's base,
        as HF does with `max(position_ids) + 1` of the forward that computes the token.
        """
        pos = positions.to(torch.float32)
        kind = None if self.scaling is None else self.scaling.rope_type
        if kind == "dynamic":
            lens = scale_lens if scale_lens is not None else positions + 1
            freqs = pos[:, None] * self._dynamic_inv_freq(lens)  # [T, dim/2]
        elif kind == "longrope":  # HF picks long factors once the sequence passes the original length
            lens = scale_lens if scale_lens is not None else positions + 1
            long = (lens > self.scaling.original_max_position_embeddings)[:, None].to(pos.device)
            inv = torch.where(long, self.long_inv_freq[None, :], self.inv_freq[None, :])
            freqs = pos[:, None] * inv.to(pos.device)
        else:
            freqs = pos[:, None] * self.inv_freq[None, :].to(pos.device)  # [T, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, dim]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        cos, sin = cos.to(dtype), sin.to(dtype)
        half = self.dim // 2
        # sin with rotate_half's sign folded in: rotate_half(x) * sin == x.roll(half) * signed_sin exactly.
        return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos / signed_sin: [T, head_dim] from RotaryEmbedding.

    HF's x * cos + rotate_half(x) * sin, bit for bit, in four ops instead of eight (one per layer
    for q and k together): decode runs this 30 times a token, where op count is the cost.
    """
    half = x.shape[-1] // 2
    return x * cos[:, None, :] + x.roll(half, dims=-1) * signed_sin[:, None, :]
