"""Block-wise and rank-1 quantizers: nearest rounding, packing, error bounds, non-finite isolation."""

import pytest
import torch

from slimlm.optim.qmaps import unsigned_8bit_map
from slimlm.optim.quantize import (
    CodeTable,
    blockwise_decode,
    blockwise_encode,
    lookup_codes,
    pack_nibbles,
    rank1_decode,
    rank1_encode,
    rank1_maxima,
)
from slimlm.optim.variants import SIGNED_4BIT, SIGNED_8BIT, ZERO_FREE_4BIT, ZERO_FREE_8BIT

CPU = torch.device("cpu")
TABLES = {
    "signed4": SIGNED_4BIT,
    "zero_free4": ZERO_FREE_4BIT,
    "signed8": SIGNED_8BIT,
    "zero_free8": ZERO_FREE_8BIT,
    "unsigned8_with_zero": CodeTable(unsigned_8bit_map()),
}


def brute_force_nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry; on an exact tie the lower one (argmin returns the first)."""
    return (x[:, None].double() - table[None, :].double()).abs().argmin(dim=1)


@pytest.mark.parametrize("name", TABLES)
def test_lookup_is_nearest_entry_with_ties_going_down(name):
    table = TABLES[name].values
    g = torch.Generator().manual_seed(0)
    low = -1.0 if float(table[0]) < 0 else 0.0
    x = torch.cat(
        [
            torch.rand(20000, generator=g) * (1.0 - low) + low,
            torch.randn(2000, generator=g) * 1e-5,  # the dense small-magnitude end of the dynamic tables
            table,
            (table[1:] + table[:-1]) / 2,  # exact midpoints: the lower code wins
            torch.tensor([0.0, -0.0, 1.0, low]),
        ]
    )
    codes = lookup_codes(x, TABLES[name].tensors(CPU))
    assert codes.dtype == torch.uint8
    midpoints = (table[1:] + table[:-1]) / 2
    # Definition: the code is the number of decision boundaries strictly below x.
    assert torch.equal(codes.long(), (x[:, None] > midpoints[None, :]).sum(dim=1))
    not_tie = ~torch.isin(x, midpoints)
    assert torch.equal(codes[not_tie].long(), brute_force_nearest(x[not_tie], table))


def test_nibbles_pack_low_first():
    codes = torch.tensor([1, 2, 3, 4, 15, 0], dtype=torch.uint8)
    assert pack_nibbles(codes).tolist() == [0x21, 0x43, 0x0F]


@pytest.mark.parametrize(
    "name,block,numel",
    [("signed4", 128, 1000), ("signed8", 256, 3000), ("zero_free8", 64, 777), ("zero_free4", 128, 300)],
)
def test_blockwise_round_trip_is_nearest_value_times_absmax(name, block, numel):
    table = TABLES[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(numel, generator=g) * torch.logspace(-4, 0, numel)[torch.randperm(numel, generator=g)]
    if float(table.values[0]) >= 0:
        x = x.abs()
    packed = table.values.numel() <= 16
    codes, absmax = blockwise_encode(x, table.tensors(CPU), block, packed)
    blocks = -(-numel // block)
    assert absmax.shape == (blocks,) and absmax.dtype == torch.float32
    assert codes.dtype == torch.uint8 and codes.numel() == blocks * block // (2 if packed else 1)
    decoded = blockwise_decode(codes, absmax, table.tensors(CPU), torch.Size([numel]), packed)

    padded = torch.nn.functional.pad(x, (0, blocks * block - numel)).view(blocks, block)
    expected_absmax = padded.abs().amax(dim=1)
    assert torch.equal(absmax, expected_absmax)
    normalized = (padded / expected_absmax[:, None]).view(-1)
    nearest = table.values[brute_force_nearest(normalized, table.values)].view(blocks, block)
    torch.testing.assert_close(decoded, (nearest * expected_absmax[:, None]).view(-1)[:numel], rtol=0, atol=0)

    # Error bound from the table: half the widest gap, or the distance from the range's ends ([-1, 1] or
    # [0, 1]) to the table's ends.
    values = table.values.double()
    bottom = -1.0 if float(values[0]) < 0 else 0.0
    worst = max(float((values[1:] - values[:-1]).max()) / 2, 1 - float(values[-1]), float(values[0]) - bottom)
    # (+1e-6 of absmax: float32 rounding of value * absmax)
    bound = expected_absmax[:, None].expand(blocks, block).reshape(-1)[:numel] * (worst + 1e-6)
    assert bool(((decoded - x).abs() <= bound).all())


def test_rank1_scale_is_min_of_row_and_column_max_and_never_decodes_to_zero():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(48, 80, generator=g).square() * torch.logspace(-6, 0, 80)
    v[3, :] = 0.0  # an all-zero row must not produce NaN
    codes, maxima = rank1_encode(v, ZERO_FREE_4BIT.tensors(CPU))
    assert [m.shape for m in maxima] == [(48,), (80,)] and codes.numel() == 48 * 80 // 2
    assert torch.equal(maxima[0], v.amax(dim=1)) and torch.equal(maxima[1], v.amax(dim=0))
    decoded = rank1_decode(codes, maxima, ZERO_FREE_4BIT.tensors(CPU))
    scale = torch.minimum(v.amax(dim=1, keepdim=True), v.amax(dim=0, keepdim=True))
    assert bool((v <= scale).all())
    # Zero-free: every element whose row and column are not all zero decodes to >= scale/16 > 0.
    nonzero_scale = scale > 0
    assert bool((decoded[nonzero_scale] >= scale[nonzero_scale] / 16 * (1 - 1e-6)).all())
    assert bool((decoded[~nonzero_scale] == 0).all()) and bool(torch.isfinite(decoded).all())
    # Above the first level the error is at most half a step (scale/32); below it, at most scale/16.
    upper = v >= scale / 16
    err = (decoded - v).abs()
    assert bool((err[upper] <= scale.expand_as(v)[upper] / 32 * (1 + 1e-6)).all())
    assert bool((err <= scale / 16 * (1 + 1e-6)).all())


def test_rank1_handles_three_dims_and_odd_sizes():
    g = torch.Generator().manual_seed(3)
    v = torch.rand(3, 5, 7, generator=g)
    codes, maxima = rank1_encode(v, ZERO_FREE_4BIT.tensors(CPU))
    assert [m.numel() for m in maxima] == [3, 5, 7] and codes.numel() == (105 + 1) // 2
    decoded = rank1_decode(codes, maxima, ZERO_FREE_4BIT.tensors(CPU))
    scale = torch.minimum(torch.minimum(maxima[0][:, None, None], maxima[1][None, :, None]), maxima[2])
    assert decoded.shape == v.shape and bool(((decoded - v).abs() <= scale / 16 * (1 + 1e-6)).all())


def test_non_finite_values_do_not_change_their_neighbours_scales():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, generator=g)
    poisoned = x.clone()
    poisoned[5], poisoned[300] = float("nan"), float("inf")
    t = SIGNED_4BIT.tensors(CPU)
    clean_codes, clean_absmax = blockwise_encode(
        x.clone().index_fill_(0, torch.tensor([5, 300]), 0.0), t, 128, True
    )
    codes, absmax = blockwise_encode(poisoned, t, 128, True)
    assert torch.equal(absmax, clean_absmax)
    decoded = blockwise_decode(codes, absmax, t, x.shape, True)
    expected = blockwise_decode(clean_codes, clean_absmax, t, x.shape, True)
    keep = torch.ones(512, dtype=torch.bool)
    keep[[5, 300]] = False
    assert torch.equal(decoded[keep], expected[keep]) and bool(torch.isfinite(decoded).all())
    v = torch.rand(16, 32, generator=g)
    v[2, 3] = float("nan")
    maxima = rank1_maxima(v)
    assert bool(torch.isfinite(maxima[0]).all()) and bool(torch.isfinite(maxima[1]).all())


def test_code_table_validation():
    with pytest.raises(ValueError):
        CodeTable(torch.tensor([0.5, 0.1]))
    with pytest.raises(ValueError):
        CodeTable(torch.linspace(0, 1, 300))
