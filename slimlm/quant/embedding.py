"""Quantized token embeddings and lm_head: one quantized [vocab, hidden] matrix serves both.

`QuantEmbedding` looks rows up in a QuantLinear's storage: it gathers the codes, scales and zero points of
just the requested rows and dequantizes those (bit-identical to `table.dequantized_weight()[ids]`). With
tied embeddings the table *is* the model's lm_head QuantLinear (kept as a plain attribute, not a child
module, so the model holds and saves one copy); the lm_head matmul runs on the same kernels as any other
QuantLinear. Untied, the embedding owns its table (a registered child) and the lm_head is quantized apart.

Row gathers per backend:
- Int8Linear: the int8 weight is row-major [V, K]; index it.
- Int8PairLinear (grouped int8 as nibble pairs on the int4 kernel's layout): its own `row_codes`, by the
  same row period as below; the exact scales and zero points are plain [V, groups] tensors.
- DequantLinear: nibble-packed rows [V, K/2]; index and unpack.
- Int4TinyGemmLinear: the kernel's packed layout is tiled. linear.py probes it on a small [256, K] matrix
  (`_periodic_layout`) for a row period P (16..128): nibble(r, c) = (r // P)·P·K + offsets[r % P, c].
  The plan is then checked on the real matrix: one-hot inputs through the kernel must give our gathered
  column values. If no period is found or the check fails (another ISA or layout), the builder uses a
  DequantLinear table instead (one copy, correct, lm_head slower); after a device move to such a layout, a
  plain nibble-packed copy is made for lookups (correct, one extra V·K/2 bytes).
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quant.int8pair import Int8PairLinear
from slimlm.quant.linear import (
    DequantLinear,
    Int4TinyGemmLinear,
    Int8Linear,
    QuantLinear,
    _gather_int4,
    _nibbles_at,
    _periodic_layout,
    make_quant_linear,
    portable_zeros,
)
from slimlm.quant.rtn import rtn_quantize
from slimlm.quant.scheme import QuantizedWeight, check_scheme, unpack_nibbles

EMBED_PATH = "model.embed_tokens"


class QuantEmbedding(nn.Module):
    """nn.Embedding over a quantized table; forward(ids) -> [*ids.shape, hidden] in `self.dtype`."""

    def __init__(
        self, table: QuantLinear, dtype: torch.dtype, tied: bool, lookup_scale: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if table.perm is not None:
            raise SlimlmError("a quantized embedding table cannot have an act-order permutation")
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.dtype, self.tied = dtype, tied
        if tied:  # owned by the model's lm_head; not a child, so state_dict and .to() see it once
            self.__dict__["_shared_table"] = table
        else:
            self.own_table = table
        self._plan_key, self._plan = None, None  # int4 gather plan, per device and storage
        self._copy_key, self._copy = None, None  # fallback lookup table, see _lookup_copy
        # AWQ on a tied head: the table holds W·s (s folded into the final norm); lookups divide by s.
        scale = None if lookup_scale is None else lookup_scale.detach().float().reshape(self.embedding_dim)
        self.register_buffer("lookup_scale", scale)

    @property
    def table(self) -> QuantLinear:
        return self.__dict__["_shared_table"] if self.tied else self.own_table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_rows(ids.reshape(-1))
        if self.lookup_scale is not None:
            out = (rows.dequantize(torch.float32) / self.lookup_scale.float()).to(self.dtype)
        else:
            out = rows.dequantize(self.dtype)
        return out.view(*ids.shape, self.embedding_dim)

    def weight_rows(self, ids: torch.Tensor) -> QuantizedWeight:
        """Codes, scales and zeros of rows `ids` only (1-D int tensor)."""
        table = self.table
        if isinstance(table, Int8Linear):
            codes = (table.weight_int8[ids].to(torch.int16) + 128).to(torch.uint8)
            scales = table.scales.view(torch.bfloat16)[ids].unsqueeze(1)
            return QuantizedWeight(
                codes, scales, torch.full_like(scales, 128, dtype=torch.int32), 8, table.in_features
            )
        if isinstance(table, Int8PairLinear):
            return QuantizedWeight(table.row_codes(ids), table.scales[ids], table.row_zeros(ids), 8,
                                   table.group_size)  # fmt: skip
        if isinstance(table, DequantLinear):
            codes = unpack_nibbles(table.codes[ids]) if table.bits == 4 else table.codes[ids]
            return QuantizedWeight(codes, table.scales[ids], portable_zeros(table.zeros[ids]), table.bits,
                                   table.group_size)  # fmt: skip
        plan = self._row_plan() if isinstance(table, Int4TinyGemmLinear) else None
        if plan is None:
            return self._lookup_copy().weight_rows(ids)
        codes = _gather_int4(table.packed, *plan, ids)
        sz = table.scale_and_zero.view(torch.bfloat16)[:, ids].transpose(0, 1)  # [T, groups, 2]
        scales = sz[..., 0]
        zeros = 8 - sz[..., 1].float() / scales.float()  # as quantized_weight()
        zeros = zeros if getattr(table, "float_zero", False) else torch.round(zeros).to(torch.int32)
        return QuantizedWeight(codes, scales, zeros, 4, table.group_size)

    def _row_plan(self):
        table = self.table
        key = (table.packed.device, table.packed.data_ptr())
        if key != self._plan_key:
            self._plan_key, self._plan = key, int4_row_plan(table)
        return self._plan

    def _lookup_copy(self) -> QuantEmbedding:
        # A plain nibble-packed copy, made only for packed layouts we cannot gather rows from.
        key = (self.table.device, id(self.table))
        if self._copy_key != key:
            table = DequantLinear(self.table.quantized_weight(), None)
            self._copy_key = key
            self.__dict__["_copy"] = QuantEmbedding(table, self.dtype, tied=False)  # not a child module
        return self._copy

    def quantized_table(self, chunk: int = 4096) -> QuantizedWeight:
        """The whole table, portable, gathered `chunk` rows at a time."""
        parts = [self.weight_rows(torch.arange(i, min(i + chunk, self.num_embeddings), device=self.table.device))
                 for i in range(0, self.num_embeddings, chunk)]  # fmt: skip
        first = parts[0]
        return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                               torch.cat([p.zeros for p in parts]), first.bits, first.group_size)  # fmt: skip

    def dequantized_table(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float [vocab, hidden] matrix of lookups (the table divided by lookup_scale, if any)."""
        table = self.quantized_table().dequantize(torch.float32)
        return (table if self.lookup_scale is None else table / self.lookup_scale.float()).to(dtype)

    def _apply(self, fn, recurse=True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # follow model.to(dtype) like a float weight
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        t = self.table
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={t.bits}, group={t.group_size}, " \
               f"tied={self.tied}, table={type(t).__name__}, lookup_scale={self.lookup_scale is not None}"  # fmt: skip


def embedding_scheme(
    bits: int, group_size: int, sym: bool, table_group: int | None = None
) -> tuple[int, bool]:
    """(group size, sym) for the embedding/lm_head. `table_group` (`quantize --embedding-group-size`) is
    the table's own group size when given; else 8 bits are per-channel symmetric (the int8 kernel's
    scheme) and 4 bits take the decoder's group size and symmetry (the int4 kernel's). 8 bits are
    symmetric in every case."""
    if table_group is not None:
        return table_group, True if bits == 8 else sym
    return (-1, True) if bits == 8 else (group_size, sym)


def narrow_table(bits: int, group: int) -> bool:
    """Whether the RTN table uses the narrow symmetric grid (rtn.group_qparams): 8 bits in groups, i.e.
    llama.cpp's Q8_0 blocks at group 32 (a Q8_0 table, as GGUFs ship it, is then reproduced). The
    per-channel 8-bit table keeps the wide grid it was measured with."""
    return bits == 8 and group != -1


def check_embeddings(
    model: nn.Module, bits: int, group_size: int, table_group: int | None = None
) -> nn.Embedding:
    """The model's token embedding, validated for quantization (raises SlimlmError)."""
    embed = _get(model, EMBED_PATH)
    if not isinstance(embed, nn.Embedding):
        raise SlimlmError(f"cannot quantize the embeddings: {EMBED_PATH} is not an nn.Embedding; "
                          "pass quantize_embeddings=False (--embeddings float)")  # fmt: skip
    check_scheme(
        bits, embedding_scheme(bits, group_size, False, table_group)[0], embed.embedding_dim, EMBED_PATH
    )
    return embed


@torch.no_grad()
def quantize_embeddings(
    model: nn.Module,
    bits: int,
    group_size: int,
    sym: bool,
    float_zero: bool = False,
    head_importance: torch.Tensor | None = None,
    table_group: int | None = None,
) -> None:
    """RTN-quantize model.model.embed_tokens and lm_head in place (one shared table when tied).

    `head_importance` [hidden] (quant/search.py): the lm_head's (or the tied table's) grids are searched
    with it; an untied embedding then gets the unweighted ("mse") search, as its errors see no activation.
    `table_group`: the table's own group size (embedding_scheme); an 8-bit table in groups takes the
    narrow Q8_0 grid (rtn.group_qparams), which is never searched.
    """
    embed = check_embeddings(model, bits, group_size, table_group)
    group_size, sym = embedding_scheme(bits, group_size, sym, table_group)
    narrow = narrow_table(bits, group_size)
    head = getattr(model, "lm_head", None)
    head = head if isinstance(head, nn.Linear) else None
    tied = head is not None and head.weight is embed.weight
    if head is not None and not tied:
        check_scheme(bits, group_size, head.in_features, "lm_head")
    float_zero = float_zero and not sym
    embed_imp = head_importance if tied or head_importance is None else torch.ones_like(head_importance)
    qweight = rtn_quantize(embed.weight.detach(), bits, group_size, sym, float_zero, embed_imp, narrow)
    install_embedding(model, qweight, embed.weight.dtype, head.bias if tied else None)
    if head is not None and not tied:
        model.lm_head = make_quant_linear(
            rtn_quantize(head.weight.detach(), bits, group_size, sym, float_zero, head_importance, narrow),
            head.bias,
        )


def install_embedding(
    model: nn.Module,
    qweight: QuantizedWeight,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    lookup_scale: torch.Tensor | None = None,
) -> QuantEmbedding:
    """Swap a QuantEmbedding for model.model.embed_tokens; every nn.Linear tied to it gets the table."""
    embed = _get(model, EMBED_PATH)
    tied_names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is embed.weight
    ]
    table = build_table(qweight, bias if tied_names else None, gather=True)
    if lookup_scale is not None and not tied_names:
        raise SlimlmError("a lookup scale only applies to an embedding tied to the lm_head")
    module = QuantEmbedding(table, dtype, tied=bool(tied_names), lookup_scale=lookup_scale)
    model.get_submodule("model").embed_tokens = module
    for name in tied_names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, table)
    return module


def build_table(qweight: QuantizedWeight, bias: torch.Tensor | None, gather: bool) -> QuantLinear:
    """The fastest QuantLinear for this weight whose rows we can gather (see the module docstring)."""
    table = make_quant_linear(qweight, bias)
    if gather and isinstance(table, Int4TinyGemmLinear) and int4_row_plan(table) is None:
        table = DequantLinear(qweight, bias)
    if gather and isinstance(table, Int8PairLinear) and table.row_plan() is None:
        table = DequantLinear(qweight, bias)
    return table


def int4_row_plan(table: Int4TinyGemmLinear) -> tuple[int, torch.Tensor] | None:
    """(P, offsets [P, K]) locating every code of `table.packed` by row, verified on the kernel; or None."""
    plan = _periodic_layout(table.in_features, table.packed.device)
    if plan is None or table.out_features % plan[0]:
        return None
    return plan if _kernel_agrees(table, *plan) else None


def _kernel_agrees(table: Int4TinyGemmLinear, period: int, offsets: torch.Tensor) -> bool:
    """One-hot inputs through the kernel give W[:, c] for a few columns c; compare to our gather."""
    n, k, device = table.out_features, table.in_features, table.packed.device
    cols = torch.tensor(sorted({0, 1, k // 2 - 1, k // 2, k - 1}), device=device)
    x = torch.zeros(len(cols), k, dtype=torch.bfloat16, device=device)
    x[torch.arange(len(cols), device=device), cols] = 1
    with torch.no_grad():
        kernel = type(table).forward(table, x).float().T  # [N, c]; bias of a tied head is removed below
    if table.bias is not None:
        kernel = kernel - table.bias.float().unsqueeze(1)
    rows = torch.arange(n, device=device)
    nibbles = (rows // period * (period * k)).unsqueeze(1) + offsets[:, cols][rows % period]
    codes = _nibbles_at(table.packed, nibbles).float()
    sz = table.scale_and_zero.view(torch.bfloat16)[cols // table.group_size].float()  # [c, N, 2]
    scales, float_zeros = sz[..., 0].T, sz[..., 1].T
    expected = (codes - 8) * scales + float_zeros  # the kernel's dequantization (see linear.py)
    return bool(((kernel - expected).abs() <= 0.25 * scales).all())


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
