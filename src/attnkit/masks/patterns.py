"""Built-in mask patterns. Each is a small class with a predicate and an analytic tile rule.

All positional patterns use bottom-right alignment (``aligned_query_positions``): with
``Tq < Tk`` the last query sits on the last key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.masks.base import EMPTY, FULL, PARTIAL, Mask, aligned_query_positions


def _broadcast_index(i: Tensor, size: int) -> Tensor:
    """``i`` for a tensor dimension of ``size`` that may be 1 (shared by every index)."""
    return i if size > 1 else torch.zeros_like(i)


def in_band(d: Tensor, lower: int | None, upper: int | None) -> Tensor:
    """``lower <= d <= upper`` for key offsets ``d = k - position(q)`` (None = unbounded)."""
    allowed = torch.ones_like(d, dtype=torch.bool)
    if lower is not None:
        allowed = allowed & (d >= lower)
    if upper is not None:
        allowed = allowed & (d <= upper)
    return allowed


def _kinds(full: Tensor, empty: Tensor) -> Tensor:
    return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)


class Full(Mask):
    """Every query attends to every key."""

    name = "full"

    @property
    def identity(self):
        return ("full",)

    def predicate(self, b, h, q, k, Tq, Tk):
        return torch.ones_like(q - k, dtype=torch.bool)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        shape = (q_lo.shape[-2], k_lo.shape[-1])
        return torch.full(shape, FULL, dtype=torch.int8, device=q_lo.device)


class Band(Mask):
    """Keys at offset ``d = k - position(q)`` with ``lower <= d <= upper`` (None = unbounded).

    Causal is ``upper=0``; a sliding window of ``left`` past keys is ``lower=-left, upper=0``.
    """

    def __init__(self, lower: int | None, upper: int | None, name: str):
        self.lower, self.upper, self.name = lower, upper, name

    @property
    def identity(self):
        return ("band", self.lower, self.upper)

    @property
    def is_plain_causal(self) -> bool:
        return self.lower is None and self.upper == 0

    def predicate(self, b, h, q, k, Tq, Tk):
        return in_band(k - aligned_query_positions(q, Tq, Tk), self.lower, self.upper)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        d_min = k_lo - aligned_query_positions(q_hi, Tq, Tk)
        d_max = k_hi - aligned_query_positions(q_lo, Tq, Tk)
        full = torch.ones_like(d_min, dtype=torch.bool)
        empty = torch.zeros_like(d_min, dtype=torch.bool)
        if self.lower is not None:
            full = full & (d_min >= self.lower)
            empty = empty | (d_max < self.lower)
        if self.upper is not None:
            full = full & (d_max <= self.upper)
            empty = empty | (d_min > self.upper)
        return _kinds(full, empty)


def _per_batch(n: int | Tensor, what: str) -> int | Tensor:
    if isinstance(n, Tensor):
        if n.dim() != 1 or n.dtype.is_floating_point:
            raise ValueError(
                f"{what} must be an int or an integer tensor [B], got {tuple(n.shape)}"
            )
        if (n < 0).any():
            raise ValueError(f"{what} must be >= 0, got {n.tolist()}")
        return n.long()
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return int(n)


class _KeyRangeMask(Mask):
    """Shared checks for masks that carry one count per batch entry."""

    count: int | Tensor

    @property
    def identity(self):
        return None if isinstance(self.count, Tensor) else (type(self).__name__, self.count)

    @property
    def batch_size(self) -> int:
        return self.count.shape[0] if isinstance(self.count, Tensor) else 1

    @property
    def data_dependent(self) -> bool:
        return isinstance(self.count, Tensor)

    def _count(self, b: Tensor) -> Tensor | int:
        if isinstance(self.count, Tensor):
            return self.count[b]
        return self.count

    def _count_4d(self) -> Tensor | int:
        return self.count.view(-1, 1, 1, 1) if isinstance(self.count, Tensor) else self.count

    def check(self, B, H, Tq, Tk, device):
        super().check(B, H, Tq, Tk, device)
        if isinstance(self.count, Tensor):
            if self.count.device != torch.device(device):
                raise ValueError(f"{self!r} lives on {self.count.device}, the call on {device}")
            if (self.count > Tk).any():
                raise ValueError(
                    f"{self!r} has lengths {self.count.tolist()} but the call has only Tk={Tk} keys"
                )


class KeyPrefix(_KeyRangeMask):
    """Keys ``k < count`` (per batch entry when ``count`` is a tensor ``[B]``)."""

    def __init__(self, count: int | Tensor, name: str):
        self.count = _per_batch(count, name)
        self.name = name

    def predicate(self, b, h, q, k, Tq, Tk):
        return (k < self._count(b)) & (q >= 0)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        n = self._count_4d()
        return _kinds((k_hi < n) & (q_lo >= 0), k_lo >= n)


class KeySuffix(_KeyRangeMask):
    """Keys ``k >= Tk - count``: the last ``count`` keys (left-padded batches)."""

    def __init__(self, count: int | Tensor, name: str):
        self.count = _per_batch(count, name)
        self.name = name

    def predicate(self, b, h, q, k, Tq, Tk):
        return (k >= Tk - self._count(b)) & (q >= 0)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        start = Tk - self._count_4d()
        return _kinds((k_lo >= start) & (q_lo >= 0), k_hi < start)


class Documents(Mask):
    """Query and key attend iff they carry the same segment id (packed sequences).

    ``q_segments`` is ``[Bs, Tq]`` and ``kv_segments`` ``[Bs, Tk]`` (integer ids, any order).
    Tile rule: empty when the id ranges of the two tiles do not overlap, full when both tiles
    hold one and the same id, partial otherwise.
    """

    def __init__(self, q_segments: Tensor, kv_segments: Tensor):
        for what, seg in (("segment_ids", q_segments), ("kv_segment_ids", kv_segments)):
            if seg.dim() != 2 or seg.dtype.is_floating_point:
                raise ValueError(
                    f"{what} must be an integer tensor [B, T], got {seg.dtype} {tuple(seg.shape)}"
                )
        if q_segments.shape[0] != kv_segments.shape[0]:
            raise ValueError(
                f"segment_ids has batch {q_segments.shape[0]}, "
                f"kv_segment_ids {kv_segments.shape[0]}; they must match"
            )
        self.q_segments = q_segments.long()
        self.kv_segments = kv_segments.long()
        self.name = f"documents(B={q_segments.shape[0]}, T={q_segments.shape[1]})"

    @property
    def data_dependent(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return self.q_segments.shape[0]

    def check(self, B, H, Tq, Tk, device):
        super().check(B, H, Tq, Tk, device)
        if self.q_segments.shape[1] != Tq or self.kv_segments.shape[1] != Tk:
            raise ValueError(
                f"{self!r} was built for Tq={self.q_segments.shape[1]}, "
                f"Tk={self.kv_segments.shape[1]} but this call has Tq={Tq}, Tk={Tk}; "
                "build the mask from this call's segment ids"
            )
        if self.q_segments.device != torch.device(device):
            raise ValueError(f"{self!r} lives on {self.q_segments.device}, the call on {device}")

    def predicate(self, b, h, q, k, Tq, Tk):
        return self.q_segments[b, q] == self.kv_segments[b, k]

    @staticmethod
    def _tile_range(seg: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        tile = torch.searchsorted(starts, torch.arange(seg.shape[1], device=seg.device), right=True)
        tile = (tile - 1).expand_as(seg)
        shape = (seg.shape[0], starts.numel())
        lo = torch.full(shape, torch.iinfo(torch.long).max, device=seg.device)
        hi = torch.full(shape, torch.iinfo(torch.long).min, device=seg.device)
        return (
            lo.scatter_reduce(1, tile, seg, "amin"),
            hi.scatter_reduce(1, tile, seg, "amax"),
        )

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        qmin, qmax = self._tile_range(self.q_segments, q_lo.flatten())
        kmin, kmax = self._tile_range(self.kv_segments, k_lo.flatten())
        qmin, qmax = qmin[:, None, :, None], qmax[:, None, :, None]
        kmin, kmax = kmin[:, None, None, :], kmax[:, None, None, :]
        full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        empty = (qmax < kmin) | (kmax < qmin)
        return _kinds(full, empty)


class KeySet(Mask):
    """Keys ``k`` with ``keep[b, k]``: an arbitrary per-batch set of visible keys.

    ``keep`` is a bool tensor ``[B, Tk]`` (a Hugging Face 2-D ``attention_mask``: padding on
    either side or holes). Tile rule from prefix sums of ``keep``: full when every key of the
    tile is kept, empty when none is.
    """

    def __init__(self, keep: Tensor):
        if keep.dim() != 2 or keep.dtype != torch.bool:
            raise ValueError(
                f"keys() needs a bool tensor [B, Tk], got {keep.dtype} {tuple(keep.shape)}; "
                "convert a 0/1 attention mask with .bool()"
            )
        self.keep = keep
        self.name = f"keys(B={keep.shape[0]}, Tk={keep.shape[1]})"

    @property
    def data_dependent(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    def check(self, B, H, Tq, Tk, device):
        super().check(B, H, Tq, Tk, device)
        if self.keep.shape[1] != Tk:
            raise ValueError(f"{self!r} covers {self.keep.shape[1]} keys but this call has Tk={Tk}")
        if self.keep.device != torch.device(device):
            raise ValueError(f"{self!r} lives on {self.keep.device}, the call on {device}")

    def predicate(self, b, h, q, k, Tq, Tk):
        return self.keep[_broadcast_index(b, self.batch_size), k] & (q >= 0)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        kept = torch.nn.functional.pad(self.keep.long().cumsum(1), (1, 0))
        lo, hi = k_lo.flatten(), k_hi.flatten()
        count = (kept[:, hi + 1] - kept[:, lo])[:, None, None, :]
        return _kinds((count == hi - lo + 1) & (q_lo >= 0), (count == 0) & (q_lo >= 0))


class DenseMask(Mask):
    """A mask given as a bool tensor ``[B or 1, H or 1, Tq, Tk]`` (True = may attend).

    The escape hatch for patterns no built-in describes (e.g. a Hugging Face mask function
    evaluated on its index grid). Tile kinds come from a 2-D prefix sum of the matrix, so the
    block structure is exact but costs O(Tq·Tk) once per mask and tile size.
    """

    def __init__(self, allowed: Tensor):
        if allowed.dim() != 4 or allowed.dtype != torch.bool:
            raise ValueError(
                f"from_dense() needs a bool tensor [B, H, Tq, Tk] (B and H may be 1), "
                f"got {allowed.dtype} {tuple(allowed.shape)}"
            )
        self.allowed = allowed
        self.name = f"dense{tuple(allowed.shape)}"

    @property
    def data_dependent(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return self.allowed.shape[0]

    @property
    def num_heads(self) -> int:
        return self.allowed.shape[1]

    def check(self, B, H, Tq, Tk, device):
        super().check(B, H, Tq, Tk, device)
        if tuple(self.allowed.shape[2:]) != (Tq, Tk):
            raise ValueError(
                f"{self!r} is {tuple(self.allowed.shape[2:])} but this call has Tq={Tq}, Tk={Tk}"
            )
        if self.allowed.device != torch.device(device):
            raise ValueError(f"{self!r} lives on {self.allowed.device}, the call on {device}")

    def predicate(self, b, h, q, k, Tq, Tk):
        b = _broadcast_index(b, self.batch_size)
        return self.allowed[b, _broadcast_index(h, self.num_heads), q, k]

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        table = torch.nn.functional.pad(self.allowed.long().cumsum(2).cumsum(3), (1, 0, 1, 0))
        qlo, qhi = q_lo.flatten(), q_hi.flatten() + 1
        klo, khi = k_lo.flatten(), k_hi.flatten() + 1

        def at(rows: Tensor, cols: Tensor) -> Tensor:
            return table[:, :, rows][:, :, :, cols]

        count = at(qhi, khi) - at(qlo, khi) - at(qhi, klo) + at(qlo, klo)
        area = (qhi - qlo).view(-1, 1) * (khi - klo).view(1, -1)
        return _kinds(count == area, count == 0)


# -- public factories ---------------------------------------------------------------------


def full() -> Mask:
    """No masking: every query sees every key."""
    return Full()


def causal() -> Mask:
    """Causal mask, bottom-right aligned: query ``i`` sees keys ``j <= i + (Tk - Tq)``."""
    return Band(None, 0, "causal")


def sliding_window(left: int, right: int = 0) -> Mask:
    """Local window: query at position ``p`` sees keys ``p - left <= j <= p + right``.

    ``sliding_window(255)`` is a causal window of 256 keys (the query's own key and 255 before
    it), as in Longformer / Mistral; ``right > 0`` opens the window to future keys
    (non-causal local attention). Positions are bottom-right aligned.
    """
    for what, n in (("left", left), ("right", right)):
        if int(n) != n or n < 0:
            raise ValueError(f"sliding_window {what} extent must be an int >= 0, got {n!r}")
    return Band(-int(left), int(right), f"sliding_window({left}, {right})")


def sinks(n: int) -> Mask:
    """The first ``n`` keys (attention sinks, StreamingLLM). Combine with a window:
    ``sinks(4) | sliding_window(255)``, and with ``causal()`` for causal attention."""
    return KeyPrefix(n, f"sinks({n})")


def prefix_lm(prefix_lengths: int | Tensor) -> Mask:
    """Prefix-LM: bidirectional over the first ``prefix_lengths`` keys (int or ``[B]``),
    causal after them (T5 / UniLM prefix language modelling)."""
    return KeyPrefix(prefix_lengths, "prefix") | causal()


def key_padding(lengths: Tensor, side: str = "right") -> Mask:
    """Key padding: batch entry ``b`` has ``lengths[b]`` real keys, padded on ``side``.

    ``side="right"`` keeps keys ``j < lengths[b]``; ``side="left"`` keeps the last
    ``lengths[b]`` keys (the layout of left-padded batches in generation).
    """
    if side == "right":
        return KeyPrefix(lengths, "key_padding")
    if side == "left":
        return KeySuffix(lengths, "key_padding_left")
    raise ValueError(f"key_padding side must be 'right' or 'left', got {side!r}")


def documents(
    segment_ids: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    kv_segment_ids: Tensor | None = None,
) -> Mask:
    """Packed sequences: tokens attend only within their own document.

    Give ``segment_ids`` ``[B, T]`` (one integer id per token) or ``cu_seqlens`` ``[N + 1]``
    (cumulative document lengths of one packed row, as in FlashAttention's varlen API).
    ``kv_segment_ids`` ``[B, Tk]`` is needed only when keys differ from queries (decoding).
    Combine with ``causal()`` for causal packed training.
    """
    if (segment_ids is None) == (cu_seqlens is None):
        raise ValueError("documents() needs exactly one of segment_ids [B, T] or cu_seqlens [N+1]")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens[0] != 0:
            raise ValueError("cu_seqlens must be a 1-D tensor [N + 1] starting at 0")
        lengths = cu_seqlens.diff()
        if (lengths < 0).any():
            raise ValueError("cu_seqlens must be non-decreasing")
        ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
        segment_ids = torch.repeat_interleave(ids, lengths)[None]
    assert segment_ids is not None
    return Documents(segment_ids, segment_ids if kv_segment_ids is None else kv_segment_ids)


def keys(keep: Tensor) -> Mask:
    """Only the keys with ``keep[b, k]`` (bool ``[B, Tk]``): general key padding, e.g. a
    Hugging Face 2-D ``attention_mask``. Use ``key_padding`` when the kept keys are a prefix
    or suffix."""
    return KeySet(keep)


def from_dense(allowed: Tensor) -> Mask:
    """A mask from a bool matrix ``[B or 1, H or 1, Tq, Tk]`` (True = may attend). Prefer a
    built-in pattern when one fits: its block structure costs nothing to build."""
    return DenseMask(allowed)
