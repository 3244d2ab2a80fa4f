"""ALiBi: slopes as in the paper's code, distances bottom-right aligned, in attention; the
generic bias contract (head count, fixed vs learned)."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import masks, positional
from attnkit.testing import CASES


def paper_slopes(n: int) -> list[float]:
    """``get_slopes`` from the ALiBi reference implementation (Press et al., 2022), as written
    there: the geometric sequence for a power of two, else the closest lower power of two
    followed by every other slope of the next one."""

    def get_slopes_power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + paper_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


def test_alibi_slopes_for_eight_heads_are_powers_of_one_half() -> None:
    expected = torch.tensor([2.0**-e for e in range(1, 9)])
    torch.testing.assert_close(positional.alibi_slopes(8), expected)


@pytest.mark.parametrize("heads", [1, 2, 3, 6, 8, 12, 16, 24])
def test_alibi_slopes_follow_the_paper(heads: int) -> None:
    got = positional.alibi_slopes(heads)
    assert got.shape == (heads,)
    torch.testing.assert_close(got, torch.tensor(paper_slopes(heads)))


def test_alibi_slopes_for_six_heads_interleave_the_next_power() -> None:
    # 4 heads of the H=4 sequence (2^-2, 2^-4, 2^-6, 2^-8), then 2^-1, 2^-3 from H=8.
    expected = torch.tensor([2.0**-e for e in (2, 4, 6, 8, 1, 3)])
    torch.testing.assert_close(positional.alibi_slopes(6), expected)


def test_alibi_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_heads must be > 0"):
        positional.alibi_slopes(0)
    with pytest.raises(ValueError, match=r"slopes must have shape \[4\]"):
        positional.alibi(4, slopes=torch.ones(3))


def test_alibi_bias_is_minus_slope_times_distance_bottom_right() -> None:
    H, Tq, Tk = 6, 5, 12
    bias = positional.alibi(H).dense(Tq, Tk)
    slopes = positional.alibi_slopes(H)
    assert bias.shape == (H, Tq, Tk)
    for h in range(H):
        for i in range(Tq):
            position = i + (Tk - Tq)  # bottom-right: the last query sits on the last key
            for j in range(Tk):
                assert bias[h, i, j] == pytest.approx(-slopes[h].item() * abs(position - j))
    assert torch.equal(bias[:, -1, -1], torch.zeros(H)), "no penalty on the query's own key"


def test_alibi_in_attention_matches_formula(formula) -> None:
    q, k, v = CASES["cross_17x65_b2"].make(torch.float64, requires_grad=False)
    bias = positional.alibi(4)
    got = attnkit.attention(q, k, v, bias=bias, mask=masks.causal(), backend="reference")
    position = torch.arange(17).view(-1, 1) + (65 - 17)
    distance = (position - torch.arange(65).view(1, -1)).abs().double()
    dense_bias = -positional.alibi_slopes(4).double().view(-1, 1, 1) * distance
    expected = formula(q, k, v, bias=dense_bias, allowed=torch.arange(65) <= position)
    torch.testing.assert_close(got, expected)


def test_bias_with_wrong_head_count_is_refused() -> None:
    q = torch.randn(1, 5, 8, 16)
    with pytest.raises(ValueError, match="alibi bias has 4 heads but q has 8 heads"):
        attnkit.attention(q, q, q, bias=positional.alibi(4))


def test_fixed_alibi_has_no_parameters_but_learned_slopes_do() -> None:
    assert positional.alibi(4).parameters() == []
    slopes = positional.alibi_slopes(4).requires_grad_(True)
    assert positional.alibi(4, slopes=slopes).parameters() == [slopes]
