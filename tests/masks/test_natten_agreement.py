"""Neighborhood masks against NATTEN itself (the `natten` package, CPU path), where installed."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.grid import from_tokens, to_tokens

natten = pytest.importorskip("natten")
# NATTEN warns that its CPU path (uncompiled FlexAttention) materialises the scores: intended.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CASES = {  # grid, kernel, dilation, causal
    "1d_odd": ((37,), (7,), (1,), (False,)),
    "1d_dilated_not_dividing": ((37,), (5,), (3,), (False,)),
    "1d_causal": ((29,), (6,), (1,), (True,)),
    "2d": ((9, 11), (3, 5), (1, 1), (False, False)),
    "2d_dilated": ((10, 13), (3, 3), (3, 2), (False, False)),
    "2d_causal_rows": ((7, 9), (3, 3), (1, 1), (True, False)),
    "3d": ((4, 5, 6), (3, 3, 3), (1, 1, 2), (False, False, False)),
}


@pytest.mark.parametrize("name", CASES)
def test_neighborhood_attention_equals_natten(name: str) -> None:
    grid, kernel, dilation, causal = CASES[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, *grid, 2, 16, generator=g) for _ in range(3))
    ops = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}
    expected = ops[len(grid)](q, k, v, kernel_size=kernel, dilation=dilation, is_causal=causal)
    mask = masks.neighborhood(kernel, grid, dilation=dilation, causal=causal)
    tokens = [to_tokens(x)[0] for x in (q, k, v)]
    got = from_tokens(attnkit.attention(*tokens, mask=mask, backend="reference"), grid)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
