"""The optimizer code tables equal the published ones, derived here independently in exact arithmetic."""

from fractions import Fraction

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.optim.qmaps import (
    dynamic_map,
    linear_map_with_zero,
    signed_4bit_map,
    signed_8bit_map,
    unsigned_8bit_map,
    zero_free_linear_map,
    zero_free_unsigned_8bit_map,
)


def dynamic_tree_values(signed: bool, exponent_bits: int, total_bits: int) -> list[Fraction]:
    """Dettmers' dynamic tree type (arXiv:1511.04561) as bitsandbytes tabulates it, in exact fractions.

    For exponent e = 0 .. E-1 the fraction [0.1, 1] is split into 2**(e + total-1-E) equal bins
    (one more fraction bit when unsigned) and each bin contributes its midpoint times 10**(e - E + 1);
    the table also holds 0 and 1.
    """
    values = [Fraction(0), Fraction(1)]
    for e in range(exponent_bits):
        bins = 2 ** (e + total_bits - 1 - exponent_bits + (0 if signed else 1))
        width = Fraction(9, 10) / bins
        scale = Fraction(10) ** (e - exponent_bits + 1)
        for j in range(bins):
            mid = (Fraction(1, 10) + width * j + width / 2) * scale
            values += [mid, -mid] if signed else [mid]
    return sorted(values)


def test_4bit_first_moment_map_is_the_papers_dynamic_exponent_table():
    # Worked by hand from the construction (E=3, 4 bits, signed): bins 1, 2, 4 of [0.1, 1] at scales
    # 0.01, 0.1, 1 give 0.0055; 0.0325, 0.0775; 0.2125, 0.4375, 0.6625, 0.8875; then +-, 0 and 1.
    positives = [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875]
    expected = sorted([-v for v in positives] + [0.0] + positives + [1.0])
    table = signed_4bit_map()
    assert table.dtype == torch.float32 and table.numel() == 16
    torch.testing.assert_close(table, torch.tensor(expected), rtol=1e-6, atol=0)
    exact = [float(v) for v in dynamic_tree_values(True, 3, 4)]
    torch.testing.assert_close(table, torch.tensor(exact), rtol=1e-6, atol=0)


def test_4bit_second_moment_map_is_linear_without_zero():
    table = zero_free_linear_map(4)
    assert torch.equal(table, torch.tensor([k / 16 for k in range(1, 17)]))
    assert float(table.min()) > 0.0
    with_zero = linear_map_with_zero(4)
    assert float(with_zero[0]) == 0.0 and float(with_zero[-1]) == 1.0 and with_zero.numel() == 16


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_maps_equal_bitsandbytes_create_dynamic_map(signed):
    table = signed_8bit_map() if signed else unsigned_8bit_map()
    exact = torch.tensor([float(v) for v in dynamic_tree_values(signed, 7, 8)])
    assert table.numel() == 256 and table.unique().numel() == 256
    assert bool((table[1:] > table[:-1]).all())
    # bitsandbytes builds the table in float32, so entries match the exact values to float32 rounding.
    torch.testing.assert_close(table, exact, rtol=2e-7, atol=0)
    assert float(table[-1]) == 1.0 and 0.0 in table.tolist()
    assert int((table < 0).sum()) == (127 if signed else 0)


def test_8bit_second_moment_map_is_the_unsigned_table_without_zero():
    table = zero_free_unsigned_8bit_map()
    assert table.numel() == 255 and float(table[0]) > 0.0
    assert torch.equal(table, unsigned_8bit_map()[1:])


def test_dynamic_map_rejects_impossible_bit_counts():
    with pytest.raises(SlimlmError, match="total_bits"):
        dynamic_map(True, max_exponent_bits=8, total_bits=8)
    with pytest.raises(SlimlmError, match="entries"):
        dynamic_map(False, max_exponent_bits=2, total_bits=4)
