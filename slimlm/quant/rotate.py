"""Rotation before weight quantization (QuaRot / SpinQuant, weight-only): an orthogonal change of basis
folded into the weights, so the float model computes the same function and nothing runs online.

Why it helps 4-bit groups: a group's step is set by its largest weight; multiplying the residual-stream
readers by a (randomised) Hadamard matrix spreads each outlier column over all columns, so the groups'
ranges shrink relative to their typical weight and rounding costs less output error.

What `rotate_model` does to a Llama-family model (RMSNorm x / rms(x) · g, pre-norm residual blocks):
1. fold every RMSNorm gain g into the linears reading that norm (W ← W·diag(g), g ← 1), the final
   norm's into lm_head; rms(x) is invariant under rotation, so the norms then commute with Q;
2. rotate the residual stream by Q [hidden, hidden]: embeddings E ← E·Q, readers (q/k/v, gate/up,
   lm_head; Phi-3's fused qkv_proj/gate_up_proj) W ← W·Q, writers (o_proj, down_proj) W ← Qᵀ·W, b ← b·Q;
3. optionally (`heads=True`) rotate each value head by R [head_dim, head_dim]: v_proj's rows of a head
   W ← Rᵀ·W (b ← b·R), o_proj's columns of every query head reading it W ← W·R. Attention mixes tokens
   linearly per head, so this needs no online operation either.

A tied embedding cannot stay tied: the head must read E·diag(g_final)·Q, the lookup E·Q, and the final
norm's gain does not commute with Q (an exact fold needs it gone). So a tied model is untied: the
checkpoint carries a separate lm_head (config tie_word_embeddings false), i.e. one more vocab × hidden
table. Families whose norms are not plain gains feeding linears are refused: Gemma 3 normalises the
attention and MLP outputs before the residual add (its post-norms' gains would have to commute with Q).
The model's architecture is unchanged (norm weights become ones), so the engine and the C kernel run a
rotated checkpoint as any other.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from slimlm.errors import SlimlmError

ROTATIONS = ("hadamard", "orthogonal")
_READERS_ATTN = ("q_proj", "k_proj", "v_proj", "qkv_proj")
_READERS_MLP = ("gate_proj", "up_proj", "gate_up_proj")


def _paley_hadamard(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    jacobsthal = torch.stack([chi[(torch.arange(q) - i) % q] for i in range(q)])  # Q[i, j] = χ(j − i)
    h = torch.ones(q + 1, q + 1, dtype=torch.float64)
    h[1:, 0] = -1
    h[1:, 1:] = jacobsthal + torch.eye(q, dtype=torch.float64)
    return h


# Non-power-of-two factors built by Paley I (order: prime q); a size is 2^k times a product of these
# (SmolLM2's 576 = 4 · 12 · 12).
_PALEY = {12: 11, 20: 19, 44: 43}


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A ±1 matrix H [n, n] with H Hᵀ = n I (Sylvester doubling and Paley blocks), or None if this
    construction has none of that order."""
    blocks, rest = [], n
    while rest > 0 and rest & (rest - 1):  # not yet a power of two
        order = next((o for o in _PALEY if rest % o == 0), None)
        if order is None:
            return None
        blocks.append(_paley_hadamard(_PALEY[order]))
        rest //= order
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < rest:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    for block in blocks:
        h = torch.kron(h, block)
    return h


def random_rotation(n: int, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """An orthogonal matrix [n, n] (float64): a Hadamard matrix with random column signs, / √n
    ("hadamard", QuaRot's choice), or the Q of a Gaussian matrix's QR ("orthogonal")."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        h = hadamard_matrix(n)
        if h is None:
            raise SlimlmError(f"no Hadamard matrix of order {n} is built here (2^k times 12/20/28/44): "
                              "use --rotate orthogonal")  # fmt: skip
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
        return h * signs / math.sqrt(n)
    if kind == "orthogonal":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    raise SlimlmError(f"unknown rotation {kind!r}: use one of {', '.join(ROTATIONS)}")


def _plain_rmsnorm(norm) -> bool:
    from slimlm.models.llama import RMSNorm

    return type(norm) is RMSNorm and getattr(norm, "bias", None) is None


def _layer_parts(layer: nn.Module, index: int):
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    extra_norms = [n for n, m in layer.named_children() if "norm" in n and m not in norms]
    if extra_norms or not all(_plain_rmsnorm(n) for n in norms):
        raise SlimlmError(
            f"cannot rotate this model: layer {index} has norms other than a plain RMSNorm before attention "
            f"and MLP ({', '.join(extra_norms) or type(norms[0]).__name__}); rotation folds each norm's "
            "gain into the linears reading it (Gemma 3's norms on the block outputs do not allow that)"
        )
    readers = []
    for module, names in ((attn, _READERS_ATTN), (mlp, _READERS_MLP)):
        found = [getattr(module, n) for n in names if getattr(module, n, None) is not None]
        if not found or any(type(m) is not nn.Linear for m in found):
            raise SlimlmError(f"cannot rotate layer {index}: it needs float nn.Linear projections "
                              "(rotate before quantizing, on the model as loaded)")  # fmt: skip
        readers.append(found)
    writers = [getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)]
    if any(type(m) is not nn.Linear for m in writers):
        raise SlimlmError(f"cannot rotate layer {index}: o_proj and down_proj must be float nn.Linear")
    return norms, readers, writers


@torch.no_grad()
def _fold_gain(norm: nn.Module, readers: list[nn.Linear]) -> None:
    gain = norm.weight.double()
    for linear in readers:
        linear.weight.copy_(linear.weight.double() * gain)
    norm.weight.fill_(1.0)


def _right(linear_or_weight: torch.Tensor, q: torch.Tensor) -> None:
    linear_or_weight.copy_(linear_or_weight.double() @ q)


def _value_rows(attn: nn.Module, config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The v rows of the attention's weight (and bias): v_proj, or the tail of Phi-3's fused qkv_proj."""
    if getattr(attn, "v_proj", None) is not None:
        return attn.v_proj.weight, attn.v_proj.bias
    start = config.q_size + config.kv_size
    bias = attn.qkv_proj.bias[start:] if attn.qkv_proj.bias is not None else None
    return attn.qkv_proj.weight[start:], bias


@torch.no_grad()
def rotate_model(model: nn.Module, kind: str = "hadamard", seed: int = 0, heads: bool = True) -> dict:
    """Fold the norms and rotate `model` (a slimlm Llama-family model, float) in place; the float
    function is unchanged up to rounding. Returns the record kept in the checkpoint's quantization config.
    """
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    embed, head = getattr(inner, "embed_tokens", None), getattr(model, "lm_head", None)
    if config is None or type(embed) is not nn.Embedding or type(head) is not nn.Linear:
        raise SlimlmError("cannot rotate this model: it needs a float embedding table and lm_head "
                          "(rotate the float checkpoint, before quantizing)")  # fmt: skip
    if not _plain_rmsnorm(inner.norm):
        raise SlimlmError(f"cannot rotate this model: its final norm is {type(inner.norm).__name__}, "
                          "not a plain RMSNorm whose gain folds into lm_head (Gemma 3's 1 + w norms)")  # fmt: skip
    parts = [_layer_parts(layer, i) for i, layer in enumerate(inner.layers)]
    q = random_rotation(config.hidden_size, kind, seed)  # both before any change: a refusal leaves
    r = random_rotation(config.head_dim, kind, seed + 1) if heads else None  # the model as it was

    untied = head.weight is embed.weight
    if untied:  # see the module docstring: the head and the lookup table differ once rotated
        new_head = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        new_head = new_head.to(device=head.weight.device, dtype=head.weight.dtype)
        new_head.weight.copy_(head.weight)
        if head.bias is not None:
            new_head.bias.copy_(head.bias)
        model.lm_head = head = new_head
        model.config = config = dataclasses.replace(config, tie_word_embeddings=False)

    for norms, readers, _ in parts:
        for norm, linears in zip(norms, readers, strict=True):
            _fold_gain(norm, linears)
    _fold_gain(inner.norm, [head])

    _right(embed.weight, q)
    _right(head.weight, q)
    for _, readers, writers in parts:
        for linear in (*readers[0], *readers[1]):
            _right(linear.weight, q)
        for linear in writers:
            linear.weight.copy_(q.T @ linear.weight.double())
            if linear.bias is not None:
                _right(linear.bias, q)

    record = {"kind": kind, "seed": seed, "heads": bool(heads), "untied": untied}
    if heads:
        d = config.head_dim  # one R for every value head, so every query head's output is rotated by R
        for layer in inner.layers:
            attn = layer.self_attn
            v_weight, v_bias = _value_rows(attn, config)
            for h in range(config.num_key_value_heads):
                rows = v_weight[h * d : (h + 1) * d]
                rows.copy_(r.T @ rows.double())
                if v_bias is not None:
                    _right(v_bias[h * d : (h + 1) * d], r)
            o = attn.o_proj.weight
            for h in range(config.num_attention_heads):
                _right(o[:, h * d : (h + 1) * d], r)
    return record
