"""Primitives shared by the backends, layouts and variants: one definition per concept.

- ``expand_kv_heads``: each key/value head repeated for the query heads of its GQA group.
- ``live_tile_runs``: one query block's live key tiles, cut into runs computed one matmul each.
- ``finite_or_zero``: a log-normaliser or row maximum usable as a shift (0 for empty rows).
- ``accumulation_dtype``: the dtype scores, sums and states accumulate in.

``AttentionCall`` (``attnkit.call``, which builds on this module) holds the primitives of the
score pipeline: ``log_weights``, ``tile_weights`` and ``dense_weights``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from attnkit.masks.base import EMPTY, PARTIAL


def expand_kv_heads(x: Tensor, groups: int, dim: int) -> Tensor:
    """Each key/value head of ``x`` repeated ``groups`` times along ``dim``, so that query head
    ``h`` meets key/value head ``h // groups`` (GQA; ``groups = Hq // Hkv``, 1 for MHA).

    ``[B, T, Hkv, D] -> [B, T, Hkv * groups, D]`` with ``dim=2`` (the call layout), or
    ``[B, Hkv, T, D] -> [B, Hkv * groups, T, D]`` with ``dim=1`` (heads first). Always a new
    tensor, ``groups == 1`` included.
    """
    return x.repeat_interleave(groups, dim=dim)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that scores, sums, log-normalisers and states of ``dtype`` inputs accumulate
    in: float64 for float64, else float32 (half precision would lose the small terms)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def finite_or_zero(x: Tensor) -> Tensor:
    """``x`` with ``-inf`` entries replaced by 0, any shape. For a log-sum-exp or a row maximum
    used as a shift, ``exp(lw - shift)``: a row that sees no key has ``-inf`` there and
    ``-inf - -inf`` is NaN, while a shift of 0 leaves its weights at ``exp(-inf) = 0``."""
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


class TileRun(NamedTuple):
    """Consecutive live key tiles ``first .. stop - 1`` of one query block, computed together;
    ``partial`` lists those among them that are PARTIAL (their pairs need the mask)."""

    first: int
    stop: int
    partial: tuple[int, ...]

    @property
    def has_partial(self) -> bool:
        """True if the mask must be applied somewhere in the run."""
        return bool(self.partial)


def live_tile_runs(kinds_row: Sequence[int], max_tiles: int) -> list[TileRun]:
    """The runs of consecutive non-EMPTY tiles in ``kinds_row`` (``[nk]`` tile kinds of one
    query block: EMPTY, PARTIAL or FULL), left to right, a run cut after ``max_tiles`` tiles
    (which bounds the score buffer of one matmul). EMPTY tiles belong to no run."""
    runs: list[TileRun] = []
    start = None
    partial: list[int] = []
    for j, kind in enumerate([*kinds_row, EMPTY]):
        if start is not None and (kind == EMPTY or j - start == max_tiles):
            runs.append(TileRun(start, j, tuple(partial)))
            start = None
        if kind != EMPTY:
            if start is None:
                start, partial = j, []
            if kind == PARTIAL:
                partial.append(j)
    return runs
