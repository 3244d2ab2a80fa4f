"""Neighborhood attention layers for images and videos (NAT, DiNAT), on ``attnkit.attention``.

    layer = NeighborhoodAttention2d(dim=64, num_heads=4, kernel_size=7, dilation=2)
    y = layer(x)                                   # x [B, H, W, C] -> [B, H, W, C]

Like NATTEN's ``NeighborhoodAttention2D`` module: a qkv projection, neighborhood attention with
an optional learned relative positional bias (rpb), and an output projection. DiNA is the same
layer with ``dilation > 1`` (DiNAT alternates ``dilation=1`` and large dilations). There is no
attention dropout (``attnkit.attention`` has none); add dropout after the layer if needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnkit.api import attention
from attnkit.grid import from_tokens, to_tokens
from attnkit.masks.base import Mask
from attnkit.masks.neighborhood import neighborhood, unravel
from attnkit.positional.bias import Bias, learnable


def _floordiv(a: Tensor, b: int) -> Tensor:
    return torch.div(a, b, rounding_mode="floor")


class NeighborhoodBias(Bias):
    """NATTEN's relative positional bias for neighborhood attention.

    ``table`` is ``[H, 2k_0 - 1, ..., 2k_{n-1} - 1]``; the bias of a (query, key) pair is
    ``table[h, r_0 + k_0 - 1, ...]`` with ``r_i = y_i // d_i - x_i // d_i`` the key's offset from
    the query in dilation-group units along axis ``i``. Inside a neighborhood ``|r_i| < k_i``
    (NATTEN's ``get_pb_start`` indexing); offsets of pairs the mask removes are clipped.
    """

    name = "neighborhood_rpb"

    def __init__(
        self,
        table: Tensor,
        grid: Sequence[int],
        kernel_size: Sequence[int],
        dilation: Sequence[int],
    ):
        expected = tuple(2 * k - 1 for k in kernel_size)
        if table.dim() != 1 + len(grid) or tuple(table.shape[1:]) != expected:
            raise ValueError(
                f"neighborhood rpb table must be [H, {', '.join(map(str, expected))}], "
                f"got {tuple(table.shape)}"
            )
        self.table, self.grid = table, tuple(grid)
        self.kernel_size, self.dilation = tuple(kernel_size), tuple(dilation)

    @property
    def num_heads(self) -> int:
        return self.table.shape[0]

    def value(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        index = []
        for xq, xk, k, d in zip(
            unravel(q_pos, self.grid),
            unravel(k_pos, self.grid),
            self.kernel_size,
            self.dilation,
            strict=True,
        ):
            offset = _floordiv(xk, d) - _floordiv(xq, d)
            index.append(torch.clamp(offset, -(k - 1), k - 1) + (k - 1))
        return self.table[(h, *index)]

    def parameters(self) -> list[Tensor]:
        return learnable([self.table])

    def _tensors(self) -> list[Tensor]:
        return [self.table]

    def to(self, dtype: torch.dtype) -> Bias:
        return NeighborhoodBias(self.table.to(dtype), self.grid, self.kernel_size, self.dilation)


_AXES = {1: "L", 2: "H, W", 3: "T, H, W"}


def _per_axis(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{what} has {len(values)} entries but the layer has {ndim} axes")
    return tuple(int(v) for v in values)


class NeighborhoodAttention(nn.Module):
    """Neighborhood attention over an ``ndim``-axis grid: ``x [B, *grid, C] -> [B, *grid, C]``.

    ``qkv = Linear(C, 3C)``; heads of ``C / num_heads`` channels attend with
    ``masks.neighborhood(kernel_size, grid, dilation=, stride=, causal=)`` (NATTEN's semantics:
    each query sees exactly ``kernel_size`` neighbours per axis, shifted inward at borders),
    plus NATTEN's relative positional bias when ``rel_pos_bias``; then ``proj = Linear(C, C)``.
    The grid is read from each input, so one layer serves any image size with
    ``kernel_size * dilation <= size`` on every axis.

    With ``kernel_size`` equal to the grid (non-causal, no rpb) the layer is plain multi-head
    self-attention over all tokens.

    Papers: "Neighborhood Attention Transformer" (Hassani, Walton, Li, Li, Shi, 2023);
    "Dilated Neighborhood Attention Transformer" (Hassani & Shi, 2022).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int | Sequence[int],
        dilation: int | Sequence[int] = 1,
        *,
        ndim: int = 2,
        stride: int | Sequence[int] = 1,
        causal: bool | Sequence[bool] = False,
        rel_pos_bias: bool = False,
        qkv_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        self.dim, self.num_heads, self.ndim = dim, num_heads, ndim
        self.kernel_size = _per_axis(kernel_size, ndim, "kernel_size")
        self.dilation = _per_axis(dilation, ndim, "dilation")
        self.stride, self.causal, self.backend = stride, causal, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rpb = None
        if rel_pos_bias:
            shape = (num_heads, *(2 * k - 1 for k in self.kernel_size))
            self.rpb = nn.Parameter(nn.init.trunc_normal_(torch.empty(shape), std=0.02, a=-2, b=2))
        self._masks: dict[tuple[int, ...], Mask] = {}

    def mask(self, grid: tuple[int, ...]) -> Mask:
        """The neighborhood mask for inputs of this grid (built once per grid: its block
        structure and FlexAttention BlockMask are cached on it)."""
        if grid not in self._masks:
            self._masks[grid] = neighborhood(
                self.kernel_size,
                grid,
                dilation=self.dilation,
                stride=self.stride,
                causal=self.causal,
            )
        return self._masks[grid]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.ndim + 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects [B, {_AXES.get(self.ndim, '*grid')}, C] "
                f"with C={self.dim}, got {tuple(x.shape)}"
            )
        B, grid = x.shape[0], tuple(x.shape[1:-1])
        head_dim = self.dim // self.num_heads
        q, k, v = self.qkv(x).reshape(B, *grid, 3, self.num_heads, head_dim).unbind(-3)
        (q, _), (k, _), (v, _) = to_tokens(q), to_tokens(k), to_tokens(v)
        bias = None
        if self.rpb is not None:
            bias = NeighborhoodBias(self.rpb, grid, self.kernel_size, self.dilation)
        out = attention(q, k, v, mask=self.mask(grid), bias=bias, backend=self.backend)
        return self.proj(from_tokens(out, grid).reshape(B, *grid, self.dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}"
        )


class NeighborhoodAttention1d(NeighborhoodAttention):
    """``NeighborhoodAttention`` over sequences ``x [B, L, C]`` (NATTEN's ``NA1D`` module)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int = 1, **options):
        super().__init__(dim, num_heads, kernel_size, dilation, ndim=1, **options)


class NeighborhoodAttention2d(NeighborhoodAttention):
    """``NeighborhoodAttention`` over images ``x [B, H, W, C]`` (NATTEN's ``NA2D`` module)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int | Sequence[int],
        dilation: int | Sequence[int] = 1,
        **options,
    ):
        super().__init__(dim, num_heads, kernel_size, dilation, ndim=2, **options)


class NeighborhoodAttention3d(NeighborhoodAttention):
    """``NeighborhoodAttention`` over videos/volumes ``x [B, T, H, W, C]`` (NATTEN's ``NA3D``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int | Sequence[int],
        dilation: int | Sequence[int] = 1,
        **options,
    ):
        super().__init__(dim, num_heads, kernel_size, dilation, ndim=3, **options)
