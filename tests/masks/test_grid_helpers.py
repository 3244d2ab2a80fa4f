"""attnkit.grid: tokens to grids and back, the balanced grid helper, and their errors."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import grid, masks


@pytest.mark.parametrize("shape", [(2, 11, 3, 8), (2, 5, 7, 3, 8), (1, 3, 4, 5, 2, 4)])
def test_round_trip_in_row_major_order(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    tokens, g = grid.to_tokens(x)
    assert g == shape[1:-2]
    assert tokens.shape == (shape[0], math.prod(g), *shape[-2:])
    # token t is the grid point unravel(t): the last grid axis varies fastest
    index = torch.arange(math.prod(g)).view(g)
    point = tuple(int(c) for c in (index == 5).nonzero()[0])
    assert torch.equal(tokens[:, 5], x[(slice(None), *point)])
    assert torch.equal(grid.from_tokens(tokens, g), x)


def test_neighborhood_on_an_image_through_tokens() -> None:
    """The worked example: attention over an image's 3x3 neighbourhoods equals attention
    computed pixel by pixel over the clamped 3x3 window."""
    q, k, v = (torch.randn(1, 4, 5, 2, 8, dtype=torch.float64) for _ in range(3))
    (qt, g), (kt, _), (vt, _) = grid.to_tokens(q), grid.to_tokens(k), grid.to_tokens(v)
    out = grid.from_tokens(attnkit.attention(qt, kt, vt, mask=masks.neighborhood(3, g)), g)
    i, j = 0, 4  # a corner pixel: its window is shifted inward to rows 0..2, columns 2..4
    keys, values = k[0, 0:3, 2:5].reshape(9, 2, 8), v[0, 0:3, 2:5].reshape(9, 2, 8)
    weights = torch.softmax(torch.einsum("hd,khd->hk", q[0, i, j], keys) / math.sqrt(8), -1)
    torch.testing.assert_close(out[0, i, j], torch.einsum("hk,khd->hd", weights, values))


def test_balanced_grid() -> None:
    assert grid.balanced_grid(4096) == (64, 64)
    assert grid.balanced_grid(1025) == (25, 41)
    assert grid.balanced_grid(4096, 3) == (16, 16, 16)
    assert grid.balanced_grid(8192, 3) == (16, 16, 32)
    assert grid.balanced_grid(63, 1) == (63,)
    assert grid.balanced_grid(13) == (1, 13)
    for T, n in [(4096, 2), (32768, 3), (1000, 3), (98, 2)]:
        assert math.prod(grid.balanced_grid(T, n)) == T


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="at least one grid axis"):
        grid.to_tokens(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="grid \\(3, 4\\) holds 12 tokens but x has T=10"):
        grid.from_tokens(torch.randn(1, 10, 2, 4), (3, 4))
    with pytest.raises(ValueError, match="expects \\[B, T, heads, D\\]"):
        grid.from_tokens(torch.randn(10, 2, 4), (10,))
    with pytest.raises(ValueError, match="T >= 1 and ndim >= 1"):
        grid.balanced_grid(0)
