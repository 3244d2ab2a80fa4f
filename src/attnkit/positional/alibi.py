"""ALiBi: a fixed linear distance penalty per head.

"Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation"
(Press, Smith, Lewis, 2022).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.positional.bias import Bias, learnable


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes ``[H]``: ``2^(-8 h / H)`` for ``h = 1..H`` when ``H`` is a power of
    two; otherwise the slopes of the nearest lower power of two, then every other slope of the
    next power (Press et al., 2022, reference implementation)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads must be > 0, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest != num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(Bias):
    """ALiBi: ``bias = -m_h * |pos_i - pos_j|``.

    "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation"
    (Press et al., 2022). Under a causal mask this is the paper's ``-m_h (i - j)``; the
    absolute distance makes the non-causal (encoder) form symmetric. Slopes ``[H]`` default to
    ``alibi_slopes(H)``.
    """

    name = "alibi"
    offset_only = True

    def __init__(self, num_heads: int, slopes: Tensor | None = None):
        self.slopes = alibi_slopes(num_heads) if slopes is None else slopes
        if self.slopes.shape != (num_heads,):
            raise ValueError(
                f"alibi slopes must have shape [{num_heads}], got {tuple(self.slopes.shape)}"
            )

    @property
    def num_heads(self) -> int:
        return self.slopes.shape[0]

    def value(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return -self.slopes[h] * (q_pos - k_pos).abs()

    def parameters(self) -> list[Tensor]:
        return learnable([self.slopes])

    def _tensors(self) -> list[Tensor]:
        return [self.slopes]

    def to(self, dtype: torch.dtype) -> Bias:
        return ALiBi(self.num_heads, self.slopes.to(dtype))


def alibi(num_heads: int, slopes: Tensor | None = None) -> Bias:
    """ALiBi bias for ``num_heads`` query heads. See ``ALiBi``."""
    return ALiBi(num_heads, slopes)
