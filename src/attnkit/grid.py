"""Grid helpers: 1-D/2-D/3-D inputs ``[B, *grid, heads, D]`` to tokens ``[B, T, heads, D]`` and
back, in the row-major order that ``attnkit.masks.neighborhood`` and ``halo`` use.

    tokens, grid = to_tokens(q_image)                 # [B, H, W, heads, D] -> [B, H*W, heads, D]
    out = attnkit.attention(tokens, k, v, mask=masks.neighborhood(7, grid))
    image = from_tokens(out, grid)                    # -> [B, H, W, heads, D]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def to_tokens(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Flatten ``x [B, *grid, heads, D]`` (1 to 3 grid axes) to ``[B, T, heads, D]``,
    ``T = prod(grid)``, row-major (the last grid axis varies fastest). Returns the tokens (a
    view when ``x`` is contiguous) and ``grid``."""
    if x.dim() < 4:
        raise ValueError(
            f"to_tokens expects [B, *grid, heads, D] with at least one grid axis, got a "
            f"{x.dim()}-D tensor {tuple(x.shape)}"
        )
    grid = tuple(x.shape[1:-2])
    return x.reshape(x.shape[0], math.prod(grid), *x.shape[-2:]), grid


def from_tokens(x: Tensor, grid: Sequence[int]) -> Tensor:
    """Unflatten tokens ``x [B, T, heads, D]`` to ``[B, *grid, heads, D]`` (inverse of
    ``to_tokens``); ``T`` must equal ``prod(grid)``."""
    grid = tuple(int(g) for g in grid)
    if x.dim() != 4:
        raise ValueError(f"from_tokens expects [B, T, heads, D], got {tuple(x.shape)}")
    if math.prod(grid) != x.shape[1]:
        raise ValueError(
            f"grid {grid} holds {math.prod(grid)} tokens but x has T={x.shape[1]}; pass the "
            "grid returned by to_tokens"
        )
    return x.reshape(x.shape[0], *grid, *x.shape[2:])


def balanced_grid(T: int, ndim: int = 2) -> tuple[int, ...]:
    """The most nearly cubic grid of ``ndim`` axes whose product is exactly ``T``, axes in
    non-decreasing order: ``balanced_grid(4096) == (64, 64)``,
    ``balanced_grid(1025) == (25, 41)``, ``balanced_grid(4096, 3) == (16, 16, 16)``.
    A prime ``T`` gives ``(1, ..., 1, T)``; check the axes against your kernel sizes."""
    if T < 1 or ndim < 1:
        raise ValueError(f"balanced_grid needs T >= 1 and ndim >= 1, got T={T}, ndim={ndim}")
    if ndim == 1:
        return (T,)
    target = round(T ** (1 / ndim))
    divisors = [d for d in range(1, min(T, target + 1) + 1) if T % d == 0]
    best = None
    for d in divisors:
        rest = balanced_grid(T // d, ndim - 1)
        candidate = tuple(sorted((d, *rest)))
        if best is None or candidate[-1] - candidate[0] < best[-1] - best[0]:
            best = candidate
    assert best is not None
    return best
