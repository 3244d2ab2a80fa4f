"""Primitives shared by the backends, layouts and variants: one definition per concept.

- ``expand_kv_heads``: each key/value head repeated for the query heads of its GQA group.
- ``live_tile_runs``: one query block's live key tiles, cut into runs computed one matmul each.
- ``finite_or_zero``: a log-normaliser or row maximum usable as a shift (0 for empty rows).
- ``accumulation_dtype``: the dtype scores, sums and states accumulate in.
- ``attention_weights``: a tile's weights from its log-weights and its rows' log-normalisers.
- ``dense_weights``: the dense path from ``q``, ``k`` to every pair's weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from attnkit.masks.base import EMPTY, PARTIAL

if TYPE_CHECKING:
    # annotations only: call.py builds on this module (accumulation_dtype)
    from attnkit.call import AttentionCall


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


def attention_weights(
    call: AttentionCall,
    s: Tensor,
    lw: Tensor,
    lse: Tensor,
    q_idx: Tensor,
    k_idx: Tensor,
    *,
    normalize: bool = False,
) -> Tensor:
    """The weights ``[B, Hq, nq, nk]`` of the pairs (``q_idx`` x ``k_idx``) of a tile of
    ``call``, from their scaled scores ``s`` and log-weights ``lw = call.log_weights(s, q_idx,
    k_idx)`` (both ``[B, Hq, nq, nk]``) and their rows' log-normaliser over all keys ``lse``
    (``[B, Hq, nq, 1]``, ``-inf`` for a row that sees no key):

        w = exp(lw - lse)      normalised scores (softmax), or all scores with ``normalize``
        w = exp(lw)            unnormalised scores (sigmoid): their weights do not sum to 1
        w = sign(score) * w    signed scores (Cog)

    0 on masked pairs and in rows that see no key. ``normalize`` gives a backend's
    row-normalised weights, whose output ``call.finalize`` rescales by ``exp(lse)``."""
    if normalize or call.score.normalized:
        lw = lw - finite_or_zero(lse)
    weights = torch.exp(lw)
    if call.score.signed:
        weights = weights * torch.sign(call.scores(s, q_idx, k_idx))
    return weights


def dense_weights(
    call: AttentionCall,
    dtype: torch.dtype,
    compose_scores: Callable[[Tensor], Tensor] | None = None,
    *,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Every pair's weight for ``call``, densely in ``dtype`` (``O(Tq Tk)`` memory): weights
    ``[B, Hq, Tq, Tk]`` and each row's log-normaliser ``lse [B, Hq, Tq]`` (``-inf`` for a query
    that sees no key).

        s   = scale * q k^T          k's heads expanded for GQA
        s   = compose_scores(s)      a hook that mixes heads' scores (talking heads, DCMHA)
        lw  = call.log_weights(s)    bias, soft cap, score function; -inf where masked
        lse = logsumexp_j lw
        w   = attention_weights(...) normalised, unnormalised or signed as the score is

    ``normalize`` as in ``attention_weights``."""
    q = call.q.to(dtype).transpose(1, 2)  # [B, Hq, Tq, D]
    k = expand_kv_heads(call.k.to(dtype).transpose(1, 2), call.groups, dim=1)
    s = (q @ k.transpose(-1, -2)) * call.scale
    if compose_scores is not None:
        s = compose_scores(s)
    q_idx = torch.arange(call.Tq, device=call.device)
    k_idx = torch.arange(call.Tk, device=call.device)
    lw = call.log_weights(s, q_idx, k_idx)
    lse = torch.logsumexp(lw, dim=-1, keepdim=True)
    weights = attention_weights(call, s, lw, lse, q_idx, k_idx, normalize=normalize)
    return weights, lse.squeeze(-1)


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
