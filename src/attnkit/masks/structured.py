"""Structured 1-D patterns: dilated / strided windows and global tokens.

Query positions are bottom-right aligned (``aligned_query_positions``). Every pattern here has
an exact block structure computed in O(1) per tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit.masks.base import Mask, aligned_query_positions
from attnkit.masks.patterns import _kinds, in_band


def _floordiv(a: Tensor, b: int) -> Tensor:
    return torch.div(a, b, rounding_mode="floor")


class DilatedBand(Mask):
    """Keys at offsets ``d = k - position(q)`` with ``lower <= d <= upper`` (None = unbounded)
    and ``d % dilation == 0``.

    Exact tiles: the offsets of a tile are every integer of ``[k_lo - p_hi, k_hi - p_lo]``;
    the tile is empty iff no multiple of ``dilation`` lies in that interval clipped to the
    band, and full iff it lies in the band and (``dilation > 1``) is one multiple.
    """

    def __init__(self, lower: int | None, upper: int | None, dilation: int, name: str):
        self.lower, self.upper, self.dilation, self.name = lower, upper, dilation, name

    def predicate(self, b, h, q, k, Tq, Tk):
        d = k - aligned_query_positions(q, Tq, Tk)
        return in_band(d, self.lower, self.upper) & (d % self.dilation == 0)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        d_min = k_lo - aligned_query_positions(q_hi, Tq, Tk)
        d_max = k_hi - aligned_query_positions(q_lo, Tq, Tk)
        lo = d_min if self.lower is None else torch.clamp(d_min, min=self.lower)
        hi = d_max if self.upper is None else torch.clamp(d_max, max=self.upper)
        has_multiple = _floordiv(hi, self.dilation) * self.dilation >= lo
        in_band = (lo == d_min) & (hi == d_max)
        one_offset = (d_min == d_max) if self.dilation > 1 else torch.ones_like(in_band)
        return _kinds(in_band & one_offset & has_multiple, ~has_multiple)


class GlobalTokens(Mask):
    """Global tokens (Longformer / BigBird): a global position attends to every key and every
    query attends to it. ``is_global`` is a bool table over positions ``[0, n)``.

    Exact tiles from prefix counts: full iff all the tile's queries or all its keys are global,
    empty iff none of either is.
    """

    def __init__(self, is_global: Tensor, name: str):
        self.is_global, self.name = is_global, name
        self.prefix = torch.nn.functional.pad(is_global.long().cumsum(0), (1, 0))

    def check(self, B, H, Tq, Tk, device):
        super().check(B, H, Tq, Tk, device)
        if self.is_global.numel() > Tk:
            last = int(self.is_global.nonzero().max())
            raise ValueError(
                f"{self.name} marks position {last} global but this call has only Tk={Tk} keys"
            )
        if Tq > Tk:
            raise ValueError(f"{self.name} needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
        if self.is_global.device != torch.device(device):
            raise ValueError(f"{self.name} lives on {self.is_global.device}, the call on {device}")

    def _global(self, x: Tensor) -> Tensor:
        n = self.is_global.numel()
        if n == 0:
            return torch.zeros_like(x, dtype=torch.bool)
        return self.is_global[torch.clamp(x, 0, n - 1)] & (x >= 0) & (x < n)

    def predicate(self, b, h, q, k, Tq, Tk):
        return self._global(aligned_query_positions(q, Tq, Tk)) | self._global(k)

    def _count(self, lo: Tensor, hi: Tensor) -> Tensor:
        n = self.is_global.numel()
        prefix = self.prefix.to(lo.device)
        return prefix[torch.clamp(hi + 1, 0, n)] - prefix[torch.clamp(lo, 0, n)]

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        p_lo = aligned_query_positions(q_lo, Tq, Tk)
        p_hi = aligned_query_positions(q_hi, Tq, Tk)
        q_count, k_count = self._count(p_lo, p_hi), self._count(k_lo, k_hi)
        full = (q_count == p_hi - p_lo + 1) | (k_count == k_hi - k_lo + 1)
        return _kinds(full, (q_count == 0) & (k_count == 0))


def _extent(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{what} must be an int >= 0 or None, got {value!r}")
    return int(value)


def dilated_window(left: int, right: int = 0, dilation: int = 2) -> Mask:
    """Dilated sliding window: query at position ``p`` sees the keys ``p + j·dilation`` for
    ``-left <= j <= right`` (``left + right + 1`` keys, gaps of ``dilation - 1``), cut at the
    sequence ends (no inward shift; ``neighborhood(k, dilation=d)`` is the shifted form).

    ``right=0`` is causal. ``dilation=1`` is ``sliding_window(left, right)``. Longformer's
    dilated sliding window ("Longformer: The Long-Document Transformer", Beltagy, Peters &
    Cohan, 2020); mixing dilations across heads or layers widens the receptive field at a
    constant cost. Positions are bottom-right aligned.
    """
    left, right = _extent(left, "left"), _extent(right, "right")
    if isinstance(dilation, bool) or int(dilation) != dilation or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    dilation = int(dilation)
    name = f"dilated_window({left}, {right}, dilation={dilation})"
    return DilatedBand(-left * dilation, right * dilation, dilation, name)


def strided(stride: int, causal: bool = True) -> Mask:
    """Strided attention: keys at distances that are multiples of ``stride`` from the query
    (``(p - k) % stride == 0``), keys at or before the query when ``causal``.

    The "strided" head of the Sparse Transformer ("Generating Long Sequences with Sparse
    Transformers", Child, Gray, Radford & Sutskever, 2019); combine with a window of
    ``stride`` keys for its factorised pattern:
    ``strided(s) | sliding_window(s - 1)``. ``stride=1`` is ``causal()`` (or ``full()``).
    """
    if isinstance(stride, bool) or int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    name = f"strided({int(stride)}{', causal' if causal else ''})"
    return DilatedBand(None, 0 if causal else None, int(stride), name)


def global_tokens(positions: int | Sequence[int] | Tensor) -> Mask:
    """Global tokens: the tokens at ``positions`` attend to every key and are attended to by
    every query ("Longformer", Beltagy et al., 2020; BigBird's ITC global tokens, Zaheer et al.,
    2020). An int ``n`` means the first ``n`` tokens (e.g. ``[CLS]``).

    Combine with a local pattern: ``sliding_window(w, w) | global_tokens([0])``, and with
    ``causal()`` for decoders (a causal global token then sees the keys before it only).
    Positions are key positions; queries are bottom-right aligned.
    """
    if isinstance(positions, int) and not isinstance(positions, bool):
        if positions < 0:
            raise ValueError(f"global_tokens count must be >= 0, got {positions}")
        return GlobalTokens(torch.ones(positions, dtype=torch.bool), f"global_tokens({positions})")
    index = torch.as_tensor(positions)
    if index.numel() == 0:
        index = index.long()  # an empty list comes out as float
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(
            f"global_tokens needs an int or a 1-D sequence of integer positions, got {positions!r}"
        )
    if index.numel() and int(index.min()) < 0:
        raise ValueError(f"global token positions must be >= 0, got {index.tolist()}")
    size = int(index.max()) + 1 if index.numel() else 0
    is_global = torch.zeros(size, dtype=torch.bool, device=index.device)
    is_global[index.long()] = True
    shown = index.tolist() if index.numel() <= 8 else f"{index.numel()} positions"
    return GlobalTokens(is_global, f"global_tokens({shown})")
