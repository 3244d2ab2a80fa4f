"""Patterns on a token grid: neighborhood attention (NA, DiNA, GNA) and halo attention.

Tokens are the row-major flattening of a grid ``(L_0, ..., L_{n-1})`` (``attnkit.grid.to_tokens``
makes them from ``[B, *grid, heads, D]``). A grid pattern is a product over axes: a query at
grid coordinates ``x`` may attend to a key at ``y`` iff every axis ``i`` allows ``(x_i, y_i)``.
Each axis is a small rule object:

- ``NeighborhoodAxis``: NATTEN's neighborhood along one axis (kernel size, dilation, stride,
  causality);
- ``HaloAxis``: HaloNet's blocked local window (a block of queries sees its block plus a halo).

Both share one shape, which is what makes the block structure exact and cheap: positions with
the same index modulo the axis's dilation form a sub-grid (a *dilation group*); along the group,
query ``x'`` sees the keys ``[lo(x'), hi(x')]`` of its own group, with ``lo`` and ``hi``
non-decreasing in ``x'`` and consecutive windows touching or overlapping.

Query positions are bottom-right aligned (``aligned_query_positions``): with ``Tq < Tk`` the
queries are the last ``Tq`` tokens of the grid (e.g. the newest frame of a causal video).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from attnkit.masks._tiles import near_pairs
from attnkit.masks.base import EMPTY, Mask, aligned_query_positions
from attnkit.masks.patterns import _kinds

#: (query box, key box) pairs classified per pass of ``GridMask.tile_kinds``: bounds memory at
#: long T.
_PAIRS_PER_PASS = 1 << 21


def _floordiv(a: Tensor, b: int | Tensor) -> Tensor:
    return torch.div(a, b, rounding_mode="floor")


def unravel(index: Tensor, grid: Sequence[int]) -> list[Tensor]:
    """Row-major grid coordinates of flat token indices (one tensor per axis, same shape)."""
    coords = []
    for size in reversed(grid):
        coords.append(index % size)
        index = _floordiv(index, size)
    return coords[::-1]


class Axis(Protocol):
    """One axis of a grid pattern (see the module docstring)."""

    dilation: int

    def window(self, x: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        """Inclusive ``[lo, hi]`` of the keys seen by query ``x`` of a dilation group of ``n``
        positions, all in group coordinates (``position // dilation``)."""
        ...

    def validate(self, size: int, axis: int) -> None:
        """Raise ``ValueError`` if the rule cannot run on an axis of ``size`` positions."""
        ...

    def reach(self) -> int:
        """An upper bound of ``|key - query|`` (grid coordinates) over allowed pairs."""
        ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class NeighborhoodAxis:
    """NATTEN's neighborhood along one axis (Hassani et al. 2023; dilation: Hassani & Shi 2022;
    stride: "Generalized Neighborhood Attention", Hassani et al. 2025).

    Within a dilation group of ``n`` positions (``n = ceil((L - g) / dilation)`` for group
    ``g = x % dilation``: groups differ by one in length when ``dilation`` does not divide ``L``),
    with group coordinate ``x' = x // dilation``:

    - non-causal: the stride group of ``x'`` (``stride`` consecutive queries) is led by its
      centre query ``c = min((x' // stride) * stride + stride // 2, n - 1)``; every query of the
      group sees the ``kernel`` keys ``[s, s + kernel - 1]`` with
      ``s = clamp(c - kernel // 2, 0, n - kernel)``: the window is centred on the leader
      (one more key on the left for an even kernel) and shifted inward at the borders, so every
      query sees exactly ``kernel`` keys along the axis;
    - causal: the leader is the last query of the stride group,
      ``c = min((x' // stride) * stride + stride - 1, n - 1)``; the query sees
      ``[max(c - kernel + 1, 0), x']``: keys up to itself, at most ``kernel`` of them, no inward
      shift (the first queries see fewer keys).

    ``stride = 1`` is sliding-window NA, ``stride = kernel`` is blocked attention.
    """

    kernel: int
    dilation: int = 1
    stride: int = 1
    causal: bool = False

    def window(self, x: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        k, s = self.kernel, self.stride
        if self.causal:
            leader = torch.minimum(_floordiv(x, s) * s + (s - 1), n - 1)
            return torch.clamp(leader - (k - 1), min=0), x
        leader = torch.minimum(_floordiv(x, s) * s + s // 2, n - 1)
        start = torch.minimum(torch.clamp(leader - k // 2, min=0), n - k)
        return start, start + (k - 1)

    def validate(self, size: int, axis: int) -> None:
        if self.kernel * self.dilation > size:
            raise ValueError(
                f"neighborhood axis {axis} has {size} positions but kernel_size * dilation = "
                f"{self.kernel} * {self.dilation} = {self.kernel * self.dilation}; every dilation "
                "group needs at least kernel_size positions: lower kernel_size or dilation"
            )

    def reach(self) -> int:
        # A query always lies inside its own window (stride <= kernel), which spans
        # kernel - 1 group steps.
        return (self.kernel - 1) * self.dilation

    def describe(self) -> str:
        parts = [f"k={self.kernel}"]
        parts += [f"d={self.dilation}"] * (self.dilation > 1)
        parts += [f"s={self.stride}"] * (self.stride > 1)
        parts += ["causal"] * self.causal
        return ",".join(parts)


@dataclass(frozen=True)
class HaloAxis:
    """HaloNet's blocked local window along one axis ("Scaling Local Self-Attention for Parameter
    Efficient Visual Backbones", Vaswani et al., 2021): queries in block ``x // block`` see the
    keys of their block plus ``halo`` keys on each side. HaloNet zero-pads the image; here keys
    outside the grid simply do not exist, so border blocks see fewer keys."""

    block: int
    halo: int
    dilation: int = 1

    def window(self, x: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        start = _floordiv(x, self.block) * self.block
        hi = torch.minimum(start + (self.block - 1 + self.halo), n - 1)
        return torch.clamp(start - self.halo, min=0), hi

    def validate(self, size: int, axis: int) -> None:
        if self.block > size:
            raise ValueError(
                f"halo axis {axis} has {size} positions but block_size {self.block}; "
                "use a block no larger than the grid"
            )

    def reach(self) -> int:
        return self.block - 1 + self.halo

    def describe(self) -> str:
        return f"b={self.block},h={self.halo}"


def _axis_allows(axis: Axis, size: int, xq: Tensor, xk: Tensor) -> Tensor:
    d = axis.dilation
    group = xq % d
    n = _floordiv(size - group + (d - 1), d)
    lo, hi = axis.window(_floordiv(xq, d), n)
    yk = _floordiv(xk, d)
    return (xk % d == group) & (yk >= lo) & (yk <= hi)


def _axis_kinds(
    axis: Axis, size: int, a: Tensor, b: Tensor, c: Tensor, e: Tensor
) -> tuple[Tensor, Tensor]:
    """``(full, empty)`` of one axis's relation over queries ``[a, b]`` × keys ``[c, e]``.

    Per dilation group, the union of the windows of queries ``A..B`` is ``[lo(A), hi(B)]``
    (windows move monotonically and touch) and their intersection ``[lo(B), hi(A)]``; pairs from
    different groups are never allowed, so the rectangle can be full only if it holds one group.
    """
    d = axis.dilation
    empty = torch.ones_like(a + c, dtype=torch.bool)
    full = torch.zeros_like(empty)
    for g in range(d):
        length = (size - g + d - 1) // d
        n = torch.tensor(length, device=a.device)
        A, B = _floordiv(a - g + (d - 1), d), _floordiv(b - g, d)
        C, E = _floordiv(c - g + (d - 1), d), _floordiv(e - g, d)
        present = (A <= B) & (C <= E)
        lo_a, hi_a = axis.window(torch.clamp(A, 0, length - 1), n)
        lo_b, hi_b = axis.window(torch.clamp(B, 0, length - 1), n)
        empty &= ~(present & (lo_a <= E) & (hi_b >= C))
        in_group = present & (lo_b <= C) & (hi_a >= E)
        if d > 1:
            in_group &= (a == b) & (c == e) & (a % d == g) & (c % d == g)
        full |= in_group
    return full, empty


def range_boxes(lo: Tensor, hi: Tensor, grid: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Boxes whose union is the row-major token range ``[lo, hi]`` (inclusive, ``[N]`` each).

    Returns inclusive corners ``[N, 2n - 1, n]`` for an ``n``-axis grid; unused slots hold
    empty boxes (lower corner above the upper one on axis 0). With ``j`` the first axis where
    the two ends differ, the range is: the rest of ``lo``'s row (one box per deeper axis), the
    whole rows strictly between, and the start of ``hi``'s row.
    """
    n = len(grid)
    sizes = torch.tensor(grid, device=lo.device)
    low = torch.stack(unravel(lo, grid), -1)
    high = torch.stack(unravel(hi, grid), -1)
    first = torch.full_like(lo, n - 1)
    if n > 1:
        differs = (low != high)[:, : n - 1]
        first = torch.where(differs.any(-1), differs.int().argmax(-1), first)
    boxes: list[tuple[Tensor, Tensor, int]] = [
        (low, torch.cat([low[:, : n - 1], high[:, n - 1 :]], -1), n - 1)
    ]

    def box(base: Tensor, axis: int, start: Tensor, stop: Tensor) -> tuple[Tensor, Tensor]:
        b_lo, b_hi = base.clone(), base.clone()
        b_lo[:, axis], b_hi[:, axis] = start, stop
        b_lo[:, axis + 1 :] = 0
        b_hi[:, axis + 1 :] = sizes[axis + 1 :] - 1
        return b_lo, b_hi

    for j in range(n - 1):
        for m in range(j + 1, n):
            inner = int(m == n - 1)  # the innermost box includes the range's own end point
            boxes.append((*box(low, m, low[:, m] + 1 - inner, sizes[m] - 1), j))
            boxes.append((*box(high, m, torch.zeros_like(high[:, m]), high[:, m] - 1 + inner), j))
        boxes.append((*box(low, j, low[:, j] + 1, high[:, j] - 1), j))
    b_lo = torch.stack([b[0] for b in boxes], 1)
    b_hi = torch.stack([b[1] for b in boxes], 1)
    used = torch.stack([first == b[2] for b in boxes], 1)
    b_lo[..., 0] = torch.where(used, b_lo[..., 0], 1)
    b_hi[..., 0] = torch.where(used, b_hi[..., 0], 0)
    order = torch.argsort((~used).to(torch.int8), dim=1, stable=True)[:, : 2 * n - 1]
    index = order.unsqueeze(-1).expand(-1, -1, n)
    return b_lo.gather(1, index), b_hi.gather(1, index)


class GridMask(Mask):
    """A product of per-axis rules on a token grid (see the module docstring).

    ``grid=None`` means a 1-D grid of the call's ``Tk`` tokens. The call must have
    ``Tk == prod(grid)`` and ``Tq <= Tk``.

    Tile classification is exact: a tile's query range and key range are each split into at
    most ``2n - 1`` boxes of the grid (``range_boxes``); on a pair of boxes the pattern is the
    product of the per-axis relations, which ``_axis_kinds`` classifies exactly per dilation
    group; a tile is full (empty) iff all its box pairs are. Only tile pairs within the axes'
    reach of each other (in flat index) are classified, the others are empty. Cost:
    O(near tile pairs · (2n - 1)² · n · dilation), independent of the tile area.
    """

    def __init__(self, axes: Sequence[Axis], grid: Sequence[int] | None, name: str):
        self.axes = tuple(axes)
        self.grid = None if grid is None else tuple(int(g) for g in grid)
        self.name = name
        if self.grid is not None:
            self._validate(self.grid)

    @property
    def identity(self):
        # The axes are frozen dataclasses: equal by value, and by kind (neighborhood, halo).
        return ("grid", self.axes, self.grid)

    @property
    def unravels_grid(self) -> bool:
        return True

    def _validate(self, grid: tuple[int, ...]) -> None:
        if len(grid) != len(self.axes):
            raise ValueError(
                f"{self.name}: grid {grid} has {len(grid)} axes but the pattern has "
                f"{len(self.axes)}; give one kernel/block size per grid axis"
            )
        for i, (axis, size) in enumerate(zip(self.axes, grid, strict=True)):
            if size < 1:
                raise ValueError(f"{self.name}: grid sizes must be >= 1, got {grid}")
            axis.validate(size, i)

    def shape(self, Tk: int) -> tuple[int, ...]:
        """The grid of a call with ``Tk`` keys (``(Tk,)`` for a 1-D pattern built without one)."""
        if self.grid is None:
            self._validate((Tk,))
            return (Tk,)
        return self.grid

    def check(self, B: int, H: int, Tq: int, Tk: int, device: torch.device) -> None:
        super().check(B, H, Tq, Tk, device)
        grid = self.shape(Tk)
        if math.prod(grid) != Tk:
            raise ValueError(
                f"{self.name} is built for grid {grid} = {math.prod(grid)} tokens but this call "
                f"has Tk={Tk} keys; flatten the grid with attnkit.grid.to_tokens and build the "
                "mask for that grid"
            )
        if Tq > Tk:
            raise ValueError(
                f"{self.name} needs Tq <= Tk (queries are the last Tq tokens of the grid), "
                f"got Tq={Tq}, Tk={Tk}"
            )

    def predicate(self, b, h, q, k, Tq, Tk):
        grid = self.shape(Tk)
        p = aligned_query_positions(q, Tq, Tk)
        allowed = None
        for axis, size, xq, xk in zip(
            self.axes, grid, unravel(p, grid), unravel(k, grid), strict=True
        ):
            ok = _axis_allows(axis, size, xq, xk)
            allowed = ok if allowed is None else allowed & ok
        return allowed

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        grid = self.shape(Tk)
        p_lo = aligned_query_positions(q_lo.flatten(), Tq, Tk)
        p_hi = aligned_query_positions(q_hi.flatten(), Tq, Tk)
        k_lo, k_hi = k_lo.flatten(), k_hi.flatten()
        # Keys farther than the axes' reach (in flat index) are never allowed: only tile pairs
        # in that band need classifying, the rest are empty.
        strides = [math.prod(grid[i + 1 :]) for i in range(len(grid))]
        reach = sum(axis.reach() * stride for axis, stride in zip(self.axes, strides, strict=True))
        rows, cols = near_pairs(p_lo, p_hi, k_lo, k_hi, reach)
        q_box_lo, q_box_hi = range_boxes(p_lo, p_hi, grid)
        k_box_lo, k_box_hi = range_boxes(k_lo, k_hi, grid)
        q_used = (q_box_lo <= q_box_hi).all(-1)
        k_used = (k_box_lo <= k_box_hi).all(-1)
        boxes = q_box_lo.shape[1]
        shape = (p_lo.numel(), k_lo.numel())
        kinds = torch.full(shape, EMPTY, dtype=torch.int8, device=p_lo.device)
        per_pass = max(1, _PAIRS_PER_PASS // (boxes * boxes))
        for start in range(0, rows.numel(), per_pass):
            r, c = rows[start : start + per_pass], cols[start : start + per_pass]
            full = empty = None
            for i, (axis, size) in enumerate(zip(self.axes, grid, strict=True)):
                f, e = _axis_kinds(
                    axis,
                    size,
                    q_box_lo[r, :, None, i],
                    q_box_hi[r, :, None, i],
                    k_box_lo[c, None, :, i],
                    k_box_hi[c, None, :, i],
                )
                full = f if full is None else full & f
                empty = e if empty is None else empty | e
            used = q_used[r, :, None] & k_used[c, None, :]
            tile_full = (full | ~used).flatten(1).all(-1)
            tile_empty = (empty | ~used).flatten(1).all(-1)
            kinds[r, c] = _kinds(tile_full, tile_empty)
        return kinds


def _per_axis(value: int | bool | Sequence, n: int, what: str, kind: type) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries but the grid has {n} axes")
    for v in values:
        if kind is bool and not isinstance(v, bool):
            raise TypeError(f"{what} must be a bool or a tuple of bools, got {value!r}")
        if kind is int and (isinstance(v, bool) or int(v) != v or v < 1):
            raise ValueError(f"{what} must be an int >= 1 or a tuple of them, got {value!r}")
    return values


def _axis_count(kernel_size: int | Sequence[int], grid: Sequence[int] | None) -> int:
    if grid is not None:
        return len(grid)
    if isinstance(kernel_size, Sequence):
        if len(kernel_size) != 1:
            raise ValueError(
                f"kernel_size {tuple(kernel_size)} has {len(kernel_size)} axes: pass grid=(...) "
                "for a 2-D/3-D pattern (grid=None means 1-D over the call's Tk tokens)"
            )
        return 1
    return 1


def neighborhood(
    kernel_size: int | Sequence[int],
    grid: Sequence[int] | None = None,
    *,
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
) -> Mask:
    """Neighborhood attention on a 1-D, 2-D or 3-D token grid, with NATTEN's semantics.

    Tokens are the row-major flattening of ``grid`` (``[B, *grid, heads, D]`` →
    ``attnkit.grid.to_tokens`` → ``[B, T, heads, D]``, ``T = prod(grid)``); ``grid=None`` is a
    1-D sequence of the call's ``Tk`` tokens. Per axis (an int applies to every axis):

    - ``kernel_size``: keys per query along the axis. Non-causal: exactly ``kernel_size`` keys,
      centred on the query (one more on the left when even) and shifted inward at the borders.
    - ``dilation``: positions with the same index modulo ``dilation`` form a sub-grid and a
      query attends only within its own (DiNA). When ``dilation`` does not divide the axis,
      the first ``L % dilation`` groups have one position more; each group is treated as its
      own axis of that length (NATTEN's rule). Needs ``kernel_size * dilation <= L``.
    - ``stride`` (GNA): queries are grouped ``stride`` at a time and a group shares the window
      of its centre query (the last query when causal); ``stride = kernel_size`` is blocked
      attention. Needs ``stride <= kernel_size``.
    - ``causal``: keys at or before the query along this axis, the window of ``kernel_size``
      ending at the query's stride-group leader; queries near the start see fewer keys
      (``causal=(True, False, False)`` is causal over frames, bidirectional within a frame).

    The exact per-axis rule is ``NeighborhoodAxis``. A query attends to a key iff every axis
    allows it. ``kernel_size = grid`` (non-causal, stride 1) is dense attention, and the 1-D
    causal pattern with ``kernel_size = T`` is plain causal attention.

    The block structure is exact (``GridMask``) for any tile sizes.

    Papers: "Neighborhood Attention Transformer" (Hassani, Walton, Li, Li, Shi, 2023);
    "Dilated Neighborhood Attention Transformer" (Hassani & Shi, 2022); "Faster Neighborhood
    Attention" (Hassani, Hwu, Shi, 2024); "Generalized Neighborhood Attention" (Hassani et al.,
    2025).
    """
    n = _axis_count(kernel_size, grid)
    kernels = _per_axis(kernel_size, n, "kernel_size", int)
    dilations = _per_axis(dilation, n, "dilation", int)
    strides = _per_axis(stride, n, "stride", int)
    causals = _per_axis(causal, n, "causal", bool)
    for i, (k, s) in enumerate(zip(kernels, strides, strict=True)):
        if s > k:
            raise ValueError(
                f"stride {s} exceeds kernel_size {k} on axis {i}: queries between windows would "
                "see no keys; use stride <= kernel_size (stride = kernel_size is blocked attention)"
            )
    axes = [
        NeighborhoodAxis(int(k), int(d), int(s), c)
        for k, d, s, c in zip(kernels, dilations, strides, causals, strict=True)
    ]
    where = "" if grid is None else f", grid={tuple(grid)}"
    name = f"neighborhood({'; '.join(a.describe() for a in axes)}{where})"
    return GridMask(axes, grid, name)


def halo(
    block_size: int | Sequence[int],
    halo: int | Sequence[int],
    grid: Sequence[int] | None = None,
) -> Mask:
    """Halo attention (blocked local attention with halos) on a 1-D/2-D/3-D token grid.

    The grid is cut into blocks of ``block_size`` per axis; every query of a block attends to
    the keys of its block widened by ``halo`` positions on each side of each axis (a
    ``(b + 2h)^n`` key window, clipped at the grid borders). Tokens are the row-major flattening
    of ``grid`` (``grid=None``: 1-D over the call's ``Tk`` tokens). ``halo=0`` is plain blocked
    (window) attention. The block structure is exact.

    Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (HaloNet;
    Vaswani, Ramachandran, Srinivas, Parmar, Hechtman, Shlens, 2021).
    """
    n = _axis_count(block_size, grid)
    blocks = _per_axis(block_size, n, "block_size", int)
    halos = halo if isinstance(halo, Sequence) else (halo,) * n
    if len(halos) != n or any(isinstance(h, bool) or int(h) != h or h < 0 for h in halos):
        raise ValueError(f"halo must be an int >= 0 or one per grid axis, got {halo!r}")
    axes = [HaloAxis(int(b), int(h)) for b, h in zip(blocks, halos, strict=True)]
    where = "" if grid is None else f", grid={tuple(grid)}"
    return GridMask(axes, grid, f"halo({'; '.join(a.describe() for a in axes)}{where})")
