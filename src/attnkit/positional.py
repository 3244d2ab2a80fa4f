"""Additive positional score biases: ``s_ij += bias(h, pos_i, pos_j)``.

A bias is one function of (head, query position, key position) written with broadcasting
tensor ops, so the same code builds the dense ``[H, Tq, Tk]`` bias for the reference, the
per-tile bias of the chunked backend and the scalar ``score_mod`` term inside FlexAttention.
Query positions are bottom-right aligned (``attnkit.masks.base.aligned_query_positions``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.masks.base import aligned_query_positions


class Bias:
    """Base of additive biases. Subclasses implement ``value`` and ``num_heads``."""

    name = "bias"

    @property
    def num_heads(self) -> int:
        raise NotImplementedError

    def value(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bias for broadcastable head / query position / key position index tensors."""
        raise NotImplementedError

    def parameters(self) -> list[Tensor]:
        """Learnable tensors whose gradients attention must produce (empty if fixed)."""
        return []

    def dense(self, Tq: int, Tk: int, device: torch.device | str = "cpu") -> Tensor:
        """Bias matrix ``[H, Tq, Tk]`` for a call with ``Tq`` queries and ``Tk`` keys.

        A fixed bias (no learnable parameters) is built once per size and device and cached on
        the object (ALiBi at T=8192 costs ~1 s to build); after changing its tensors in place,
        make a new bias object. Learnable biases are rebuilt every call so gradients flow.
        """
        if self.parameters():
            return self._build_dense(Tq, Tk, device)
        cache = self.__dict__.setdefault("_dense_cache", {})
        key = (Tq, Tk, str(device))
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[key] = self._build_dense(Tq, Tk, device)
        return cache[key]

    def _build_dense(self, Tq: int, Tk: int, device: torch.device | str) -> Tensor:
        h = torch.arange(self.num_heads, device=device).view(-1, 1, 1)
        q = aligned_query_positions(torch.arange(Tq, device=device), Tq, Tk).view(1, -1, 1)
        k = torch.arange(Tk, device=device).view(1, 1, -1)
        return self.value(h, q, k).expand(self.num_heads, Tq, Tk)

    def check(self, Hq: int, device: torch.device) -> None:
        if self.num_heads != Hq:
            raise ValueError(f"{self.name} bias has {self.num_heads} heads but q has {Hq} heads")
        for p in self._tensors():
            if p.device != device:
                raise ValueError(f"{self.name} bias lives on {p.device}, the call on {device}")

    def _tensors(self) -> list[Tensor]:
        return []

    def to(self, dtype: torch.dtype) -> Bias:
        """The same bias with its tensors cast (differentiably) to ``dtype``."""
        return self

    def __repr__(self) -> str:
        return self.name


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes: ``2^(-8 h / H)`` for ``h = 1..H`` when ``H`` is a power of two;
    otherwise the slopes of the nearest lower power of two, then every other slope of the
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

    def __init__(self, num_heads: int, slopes: Tensor | None = None):
        self.slopes = alibi_slopes(num_heads) if slopes is None else slopes
        if self.slopes.shape != (num_heads,):
            raise ValueError(
                f"alibi slopes must have shape [{num_heads}], got {tuple(self.slopes.shape)}"
            )

    @property
    def num_heads(self) -> int:
        return self.slopes.shape[0]

    def value(self, h, q_pos, k_pos):
        return -self.slopes[h] * (q_pos - k_pos).abs()

    def parameters(self) -> list[Tensor]:
        return [self.slopes] if self.slopes.requires_grad else []

    def _tensors(self) -> list[Tensor]:
        return [self.slopes]

    def to(self, dtype: torch.dtype) -> Bias:
        return ALiBi(self.num_heads, self.slopes.to(dtype))


class RelativePositionBias(Bias):
    """Learned relative-position bias: one scalar per head and clipped offset ``j - i``.

    ``table`` is ``[H, 2 * max_distance + 1]``; offsets beyond ``±max_distance`` share the end
    entries (Shaw et al., 2018, scalar form; as in Swin/T5 without buckets).
    """

    name = "relative_bias"

    def __init__(self, table: Tensor, max_distance: int):
        if table.dim() != 2 or table.shape[1] != 2 * max_distance + 1:
            raise ValueError(
                f"relative bias table must be [H, 2*max_distance+1] = [H, {2 * max_distance + 1}],"
                f" got {tuple(table.shape)}"
            )
        self.table, self.max_distance = table, max_distance

    @property
    def num_heads(self) -> int:
        return self.table.shape[0]

    def value(self, h, q_pos, k_pos):
        offset = (k_pos - q_pos).clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.table[h, offset]

    def parameters(self) -> list[Tensor]:
        return [self.table] if self.table.requires_grad else []

    def _tensors(self) -> list[Tensor]:
        return [self.table]

    def to(self, dtype: torch.dtype) -> Bias:
        return RelativePositionBias(self.table.to(dtype), self.max_distance)


def alibi(num_heads: int, slopes: Tensor | None = None) -> Bias:
    """ALiBi bias for ``num_heads`` query heads. See ``ALiBi``."""
    return ALiBi(num_heads, slopes)


def relative_bias(
    num_heads: int,
    max_distance: int,
    table: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Bias:
    """Learned relative-position bias. Creates a trainable table (``N(0, 0.02)``) unless one
    is given; the returned object's ``table`` is the tensor to optimise."""
    if table is None:
        table = torch.randn(num_heads, 2 * max_distance + 1, generator=generator) * 0.02
        table.requires_grad_(True)
    if table.shape[0] != num_heads:
        raise ValueError(f"relative bias table has {table.shape[0]} heads, expected {num_heads}")
    return RelativePositionBias(table, max_distance)
