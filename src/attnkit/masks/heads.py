"""Per-head patterns in one call: any masks per head, per-head windows (MoA) and DuoAttention's
retrieval/streaming split.

A per-head mask has ``num_heads`` = the query head count ``Hq`` (GQA: the heads sharing a KV
head may still differ; keep them equal to shrink a KV cache per KV head). Its block structure
is ``[Bm, Hq, nq, nk]``: each head's own tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit.masks import patterns
from attnkit.masks._tiles import near_pairs
from attnkit.masks.base import EMPTY, Mask, _common_size, aligned_query_positions
from attnkit.masks.patterns import _broadcast_index, _kinds


class PerHead(Mask):
    """Head ``h`` uses ``masks[head_index[h]]`` (each a one-head pattern).

    The predicate selects per head with ``torch.where`` (every distinct mask is evaluated once
    per element), and the tile kinds are the stacked per-mask kinds: exact where each mask's
    are exact.
    """

    def __init__(self, masks: Sequence[Mask], head_index: Tensor, name: str):
        self.masks, self.head_index, self.name = tuple(masks), head_index.long(), name

    @property
    def num_heads(self) -> int:
        return self.head_index.numel()

    @property
    def batch_size(self) -> int:
        size = 1
        for m in self.masks:
            size = _common_size(size, m.batch_size, "batch sizes")
        return size

    @property
    def data_dependent(self) -> bool:
        return any(m.data_dependent for m in self.masks)

    @property
    def unravels_grid(self) -> bool:
        return any(m.unravels_grid for m in self.masks)

    def check(self, B, H, Tq, Tk, device):
        super().check(B, H, Tq, Tk, device)
        for m in self.masks:
            m.check(B, H, Tq, Tk, device)

    def predicate(self, b, h, q, k, Tq, Tk):
        index = self.head_index.to(h.device)[_broadcast_index(h, self.num_heads)]
        allowed = self.masks[0].predicate(b, h, q, k, Tq, Tk)
        for j, m in enumerate(self.masks[1:], start=1):
            allowed = torch.where(index == j, m.predicate(b, h, q, k, Tq, Tk), allowed)
        return allowed

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        shape = (self.batch_size, 1, q_lo.shape[-2], k_lo.shape[-1])
        stacked = torch.stack(
            [
                m.tile_kinds(q_lo, q_hi, k_lo, k_hi, Tq, Tk).to(torch.int8).expand(shape)
                for m in self.masks
            ]
        )  # [M, Bm, 1, nq, nk]
        return stacked[self.head_index.to(stacked.device), :, 0].transpose(0, 1)


class HeadWindows(Mask):
    """Causal window per head: head ``h`` at position ``p`` sees keys
    ``p - spans[h] < k <= p``. Exact tiles (the band rule per distinct span, on the tile pairs
    within the longest span; the rest are empty)."""

    def __init__(self, spans: Tensor):
        self.spans = spans.long()
        shown = self.spans.tolist() if self.spans.numel() <= 8 else f"{self.spans.numel()} heads"
        self.name = f"windows_per_head({shown})"

    @property
    def num_heads(self) -> int:
        return self.spans.numel()

    def predicate(self, b, h, q, k, Tq, Tk):
        span = self.spans.to(h.device)[_broadcast_index(h, self.num_heads)]
        d = k - aligned_query_positions(q, Tq, Tk)
        return (d <= 0) & (d > -span)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        spans, head_to_span = torch.unique(self.spans, return_inverse=True)
        span = spans.to(q_lo.device).view(-1, 1)
        p_lo = aligned_query_positions(q_lo.flatten(), Tq, Tk)
        p_hi = aligned_query_positions(q_hi.flatten(), Tq, Tk)
        k_lo, k_hi = k_lo.flatten(), k_hi.flatten()
        rows, cols = near_pairs(p_lo, p_hi, k_lo, k_hi, int(spans.max()))
        d_min, d_max = k_lo[cols] - p_hi[rows], k_hi[cols] - p_lo[rows]  # [P] tile pairs
        pair_kinds = _kinds((d_min > -span) & (d_max <= 0), (d_max <= -span) | (d_min > 0))
        kinds = torch.full(
            (spans.numel(), p_lo.numel(), k_lo.numel()), EMPTY, dtype=torch.int8, device=p_lo.device
        )
        kinds[:, rows, cols] = pair_kinds
        return kinds[head_to_span.to(kinds.device)].unsqueeze(0)


def per_head(masks: Sequence[Mask], head_index: Sequence[int] | Tensor | None = None) -> Mask:
    """A different mask per head, run in one attention call.

    ``per_head([m0, m1, ..., m_{H-1}])`` gives head ``h`` the mask ``m_h``; with ``head_index``
    (``[Hq]`` integers), head ``h`` uses ``masks[head_index[h]]`` so a few patterns can be
    shared by many heads. Each mask must be a one-head pattern (``num_heads == 1``); they may
    be compositions (``causal() & sliding_window(63)``) and may differ per batch entry.

    The block structure stacks each mask's tiles along the head axis (exact where each mask's
    is). Used by MoA ("MoA: Mixture of Sparse Attention for Automatic Large Language Model
    Compression", Fu et al., 2024) and DuoAttention (Xiao et al., 2024), see
    ``windows_per_head`` and ``duo``.
    """
    masks = list(masks)
    if not masks:
        raise ValueError("per_head needs at least one mask")
    for i, m in enumerate(masks):
        if not isinstance(m, Mask):
            raise TypeError(f"per_head entry {i} is a {type(m).__name__}, not an attnkit mask")
        if m.num_heads != 1:
            raise ValueError(
                f"per_head entry {i} ({m!r}) is itself a {m.num_heads}-head pattern; give "
                "one-head masks (one per head, or shared through head_index)"
            )
    index = torch.arange(len(masks)) if head_index is None else torch.as_tensor(head_index)
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"head_index must be one integer per head, got {head_index!r}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(masks)):
        raise ValueError(
            f"head_index values must lie in [0, {len(masks)}) (one of the {len(masks)} masks), "
            f"got {index.tolist()}"
        )
    # One predicate per distinct mask object, and none for masks no head uses.
    first_slot: dict[int, int] = {}
    slot = torch.tensor([first_slot.setdefault(id(m), i) for i, m in enumerate(masks)])
    used = sorted(set(slot[index.long()].tolist()))
    remap = torch.full((len(masks),), -1, dtype=torch.long)
    remap[torch.tensor(used, dtype=torch.long)] = torch.arange(len(used))
    kept = [masks[j] for j in used]
    shown = ", ".join(f"{m!r}" for m in kept)
    return PerHead(kept, remap[slot[index.long()]], f"per_head([{shown}], heads={index.numel()})")


def windows_per_head(spans: Sequence[int] | Tensor) -> Mask:
    """Causal sliding window with a different span per head: head ``h`` sees its last
    ``spans[h]`` keys, its own included (``spans[h] = w`` is ``sliding_window(w - 1)``; a span
    ``>= Tk`` is full causal attention).

    MoA's elastic rules ("MoA: Mixture of Sparse Attention for Automatic Large Language Model
    Compression", Fu et al., 2024) assign each head and layer its own span (growing with the
    input length); compute the spans for the call's length and pass them here. Exact block
    structure. Add sinks with ``windows_per_head(spans) | (sinks(n) & causal())``.
    """
    spans = torch.as_tensor(spans)
    if spans.dim() != 1 or spans.numel() == 0 or spans.dtype.is_floating_point:
        raise ValueError(f"spans must be one integer per head, got {spans.tolist()}")
    if int(spans.min()) < 1:
        raise ValueError(f"spans must be >= 1 (the query's own key), got {spans.tolist()}")
    return HeadWindows(spans)


def duo(retrieval_heads: Sequence[bool] | Tensor, sinks: int, window: int) -> Mask:
    """DuoAttention's split of heads ("DuoAttention: Efficient Long-Context LLM Inference with
    Retrieval and Streaming Heads", Xiao et al., 2024).

    ``retrieval_heads`` (bool ``[Hq]``) marks retrieval heads: full causal attention. The other
    (streaming) heads see the first ``sinks`` keys (attention sinks) and their last
    ``window`` keys, own key included, causally. With GQA, mark all query heads of a KV head
    alike (DuoAttention decides per KV head, so streaming KV heads keep a constant-size cache).
    """
    flags = torch.as_tensor(retrieval_heads)
    if flags.dim() != 1 or flags.dtype != torch.bool:
        raise ValueError(
            f"retrieval_heads must be a bool tensor [Hq] (True = retrieval head), got {flags!r}"
        )
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ValueError(f"duo window must be an int >= 1 (keys incl. the query), got {window!r}")
    recent = patterns.sliding_window(int(window) - 1)
    streaming = (patterns.sinks(sinks) | recent) & patterns.causal()
    mask = per_head([patterns.causal(), streaming], (~flags).long())
    mask.name = f"duo(retrieval={flags.int().tolist()}, sinks={sinks}, window={window})"
    return mask
