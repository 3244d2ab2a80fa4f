"""Tile-pair helpers for patterns whose allowed keys stay near the query."""

from __future__ import annotations

from torch import Tensor


def near_pairs(
    p_lo: Tensor, p_hi: Tensor, k_lo: Tensor, k_hi: Tensor, reach: int
) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` of the tile pairs whose key range ``[k_lo, k_hi]`` (``[nk]``) comes
    within ``reach`` of the query range ``[p_lo, p_hi]`` (``[nq]``, aligned positions).

    A pattern that allows only ``|k - p| <= reach`` classifies these pairs and leaves every
    other tile EMPTY, so its cost follows the band of live tiles, not all ``nq × nk``."""
    near = (k_lo.view(1, -1) <= p_hi.view(-1, 1) + reach) & (
        k_hi.view(1, -1) >= p_lo.view(-1, 1) - reach
    )
    rows, cols = near.nonzero(as_tuple=True)
    return rows, cols
