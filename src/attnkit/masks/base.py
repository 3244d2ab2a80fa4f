"""The mask algebra: a boolean pattern over (batch, head, query, key) that composes with & | ~.

Every mask gives three views of the same pattern, all derived from one predicate:

- ``mask_mod(Tq, Tk)``: FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool``;
- ``dense(Tq, Tk)``: the boolean matrix ``[Bm, Hm, Tq, Tk]`` the reference uses
  (``Bm``/``Hm`` are 1 when the pattern does not depend on batch/head);
- ``blocks(Tq, Tk, block_q, block_k)``: which tiles are empty, partial or full, computed
  *analytically* from tile bounds, never by evaluating all Tq×Tk pairs.

Query positions are aligned bottom-right: query ``i`` of ``Tq`` sits at position
``i + (Tk - Tq)`` among the keys, so the last query lines up with the last key (decoding,
chunked prefill). Every positional pattern uses this one alignment, defined here.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2


def aligned_query_positions(q_idx: Tensor, Tq: int, Tk: int) -> Tensor:
    """Position of query ``q_idx`` on the key axis (bottom-right alignment)."""
    return q_idx + (Tk - Tq)


@dataclass(frozen=True)
class BlockStructure:
    """Tile classification of a mask: ``kinds[b, h, i, j]`` in {EMPTY, PARTIAL, FULL}.

    ``kinds`` has shape ``[Bm, Hm, ceil(Tq / block_q), ceil(Tk / block_k)]`` (int8); the last
    tile of each axis may be short. An analytic structure may call a tile PARTIAL when it is
    in fact full or empty (never the reverse), so it is always safe to compute from.
    """

    kinds: Tensor
    block_q: int
    block_k: int
    Tq: int
    Tk: int

    @property
    def num_q_blocks(self) -> int:
        return self.kinds.shape[-2]

    @property
    def num_k_blocks(self) -> int:
        return self.kinds.shape[-1]

    def live_fraction(self) -> float:
        """Fraction of tiles that must be computed (partial or full)."""
        return self._live_fraction

    @functools.cached_property
    def _live_fraction(self) -> float:
        # Read by ``auto`` on every call; the structure is immutable and cached per mask.
        return (self.kinds != EMPTY).float().mean().item()

    @functools.cached_property
    def partial_fraction(self) -> float:
        """Fraction of tiles that need the mask applied pair by pair (PARTIAL)."""
        return (self.kinds == PARTIAL).float().mean().item()

    def union_over_batch_heads(self) -> Tensor:
        """``[nq, nk]`` kinds for a kernel that processes every batch and head together:
        a tile is live if any (b, h) needs it, and full only if it is full for all of them."""
        live = (self.kinds != EMPTY).flatten(0, 1).any(0)
        full = (self.kinds == FULL).flatten(0, 1).all(0)
        out = torch.full(live.shape, EMPTY, dtype=torch.int8, device=live.device)
        out[live] = PARTIAL
        out[full] = FULL
        return out


def _tile_bounds(T: int, block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    starts = torch.arange(0, T, block, device=device)
    ends = torch.clamp(starts + block, max=T) - 1  # inclusive
    return starts, ends


class Mask:
    """Base class of every mask. Subclasses implement ``predicate`` and ``tile_kinds``.

    ``predicate(b, h, q, k, Tq, Tk)`` receives broadcastable integer tensors (scalars inside
    FlexAttention, ``arange`` views for the dense matrix) and returns a bool tensor.
    ``tile_kinds(q_lo, q_hi, k_lo, k_hi, Tq, Tk)`` receives inclusive tile bounds shaped
    ``[1, 1, nq, 1]`` / ``[1, 1, 1, nk]`` and returns int8 kinds broadcastable to
    ``[Bm, Hm, nq, nk]``.
    """

    #: name shown in repr, explanations and benchmark tables
    name: str = "mask"

    # -- what subclasses implement -------------------------------------------------------
    def predicate(self, b: Tensor, h: Tensor, q: Tensor, k: Tensor, Tq: int, Tk: int) -> Tensor:
        raise NotImplementedError

    def tile_kinds(
        self, q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, Tq: int, Tk: int
    ) -> Tensor:
        raise NotImplementedError

    @property
    def identity(self) -> tuple | None:
        """A hashable description of the pattern when plain parameters define it (equal
        identities, equal patterns), or None when it carries tensors (documents, padding,
        dense masks). Masks with an identity share their derived objects (tile structures,
        plans, BlockMasks), so a mask built anew for every call (``mask=masks.causal()`` in a
        model's forward) does not rebuild them every call."""
        return None

    @property
    def batch_size(self) -> int:
        """Batch entries the pattern distinguishes (1 = same for every batch entry)."""
        return 1

    @property
    def num_heads(self) -> int:
        """Heads the pattern distinguishes (1 = same for every head)."""
        return 1

    @property
    def data_dependent(self) -> bool:
        """True if the pattern is data of one batch (segment ids, lengths, kept keys, a dense
        matrix) rather than a rule of positions: it must be built for each batch, so it cannot
        be fixed when a layer is built."""
        return False

    @property
    def unravels_grid(self) -> bool:
        """True if the predicate maps token indices to grid coordinates (integer divisions per
        pair): costly per pair where a backend evaluates it elementwise (partial tiles)."""
        return False

    @property
    def is_plain_causal(self) -> bool:
        """True if this mask is ``causal()`` itself: query ``i`` sees exactly the keys
        ``j <= i + (Tk - Tq)`` (bottom-right aligned), whatever the sizes. Answered from the
        mask's structure, not by comparing patterns, so that a causal fast path is taken only
        for the mask a user wrote as causal: a window wider than a call's keys, or a
        composition such as ``causal() & sinks(4)``, answers False and runs as the mask it is."""
        return False

    def is_top_left_causal(self, Tq: int, Tk: int) -> bool:
        """True if, for ``Tq`` queries and ``Tk`` keys, this mask is the top-left-aligned
        causal pattern ``j <= i`` that kernels' causal flags compute (SDPA's ``is_causal``):
        a plain causal mask on square sizes, where the two alignments coincide. For
        ``Tq != Tk``, ``causal()`` lets each query see ``Tk - Tq`` keys more (a decoding
        query sees the whole cache), which such a flag would drop."""
        return self.is_plain_causal and Tq == Tk

    def check(self, B: int, H: int, Tq: int, Tk: int, device: torch.device) -> None:
        """Raise ``ValueError`` if this mask cannot serve a call of these sizes."""
        if self.batch_size not in (1, B):
            raise ValueError(
                f"{self!r} was built for a batch of {self.batch_size} but this call has B={B}; "
                "build the mask from this batch's lengths/segment ids"
            )
        if self.num_heads not in (1, H):
            raise ValueError(
                f"{self!r} has a pattern for {self.num_heads} heads but q has {H} heads"
            )

    # -- the derived views ----------------------------------------------------------------
    def mask_mod(self, Tq: int, Tk: int) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """FlexAttention ``mask_mod`` for a call with ``Tq`` queries and ``Tk`` keys."""

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return self.predicate(b, h, q_idx, kv_idx, Tq, Tk)

        mask_mod.__name__ = f"mask_mod_{type(self).__name__}"
        return mask_mod

    def dense(self, Tq: int, Tk: int, device: torch.device | str = "cpu") -> Tensor:
        """Boolean matrix ``[Bm, Hm, Tq, Tk]``, True where a query may attend to a key."""
        device = torch.device(device)
        b = torch.arange(self.batch_size, device=device).view(-1, 1, 1, 1)
        h = torch.arange(self.num_heads, device=device).view(1, -1, 1, 1)
        q = torch.arange(Tq, device=device).view(1, 1, -1, 1)
        k = torch.arange(Tk, device=device).view(1, 1, 1, -1)
        allowed = self.predicate(b, h, q, k, Tq, Tk)
        return allowed.expand(self.batch_size, self.num_heads, Tq, Tk)

    def blocks(
        self,
        Tq: int,
        Tk: int,
        block_q: int = 128,
        block_k: int = 128,
        device: torch.device | str = "cpu",
    ) -> BlockStructure:
        """Analytic tile classification (cached per sizes and device)."""
        device = torch.device(device)
        key = ("blocks", Tq, Tk, block_q, block_k, str(device))
        cached = self._cache().get(key)
        if cached is not None:
            return cached
        q_lo, q_hi = _tile_bounds(Tq, block_q, device)
        k_lo, k_hi = _tile_bounds(Tk, block_k, device)
        kinds = self.tile_kinds(
            q_lo.view(1, 1, -1, 1),
            q_hi.view(1, 1, -1, 1),
            k_lo.view(1, 1, 1, -1),
            k_hi.view(1, 1, 1, -1),
            Tq,
            Tk,
        )
        shape = (self.batch_size, self.num_heads, q_lo.numel(), k_lo.numel())
        kinds = kinds.to(torch.int8).expand(shape).contiguous()
        structure = BlockStructure(kinds, block_q, block_k, Tq, Tk)
        self._cache()[key] = structure
        return structure

    def cached(self, key: tuple, build: Callable[[], object]) -> object:
        """Per-mask cache for derived objects (FlexAttention BlockMasks, row counts, ...)."""
        store = self._cache()
        if key not in store:
            if len(store) > 64:
                store.clear()
            store[key] = build()
        return store[key]

    def _cache(self) -> dict:
        store = self.__dict__.get("_derived")
        if store is None:
            identity = self.identity
            if identity is None or not _SHARING.get():
                store = {}
            else:
                if len(_SHARED_CACHES) >= _SHARED_CACHE_MASKS:
                    _SHARED_CACHES.clear()
                store = _SHARED_CACHES.setdefault((type(self), identity), {})
            object.__setattr__(self, "_derived", store)
        return store

    # -- composition ----------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return And(self, _as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return Or(self, _as_mask(other))

    def __invert__(self) -> Mask:
        return Not(self)

    def __repr__(self) -> str:
        return self.name


def _as_mask(obj: object) -> Mask:
    if not isinstance(obj, Mask):
        raise TypeError(f"masks compose only with masks, got {type(obj).__name__}")
    return obj


#: Derived-object stores of masks with an identity, keyed by (class, identity); bounded like
#: every cache here (a mask keeps its store when the table is cleared).
_SHARED_CACHES: dict[tuple, dict] = {}
_SHARED_CACHE_MASKS = 64
_SHARING: contextvars.ContextVar[bool] = contextvars.ContextVar("mask_sharing", default=True)


@contextlib.contextmanager
def private_caches() -> Iterator[None]:
    """Masks first used inside get caches of their own, not the store shared by equal masks:
    for benchmarks that time building a mask's derived objects from scratch (this thread or
    task only)."""
    token = _SHARING.set(False)
    try:
        yield
    finally:
        _SHARING.reset(token)


def _identity_of(tag: str, *parts: Mask) -> tuple | None:
    identities = [part.identity for part in parts]
    return None if None in identities else (tag, *identities)


def _common_size(a: int, b: int, what: str) -> int:
    if a != b and 1 not in (a, b):
        raise ValueError(f"cannot combine masks built for {what} {a} and {b}")
    return max(a, b)


class And(Mask):
    """Attend where both masks allow (tile kind: the smaller of the two)."""

    def __init__(self, left: Mask, right: Mask):
        self.left, self.right = left, right
        self.name = f"({left!r} & {right!r})"

    @property
    def identity(self) -> tuple | None:
        return _identity_of(type(self).__name__, self.left, self.right)

    def predicate(self, b, h, q, k, Tq, Tk):
        return self.left.predicate(b, h, q, k, Tq, Tk) & self.right.predicate(b, h, q, k, Tq, Tk)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        return torch.minimum(
            self.left.tile_kinds(q_lo, q_hi, k_lo, k_hi, Tq, Tk).to(torch.int8),
            self.right.tile_kinds(q_lo, q_hi, k_lo, k_hi, Tq, Tk).to(torch.int8),
        )

    @property
    def batch_size(self):
        return _common_size(self.left.batch_size, self.right.batch_size, "batch sizes")

    @property
    def num_heads(self):
        return _common_size(self.left.num_heads, self.right.num_heads, "head counts")

    @property
    def data_dependent(self) -> bool:
        return self.left.data_dependent or self.right.data_dependent

    @property
    def unravels_grid(self) -> bool:
        return self.left.unravels_grid or self.right.unravels_grid

    def check(self, B, H, Tq, Tk, device):
        self.left.check(B, H, Tq, Tk, device)
        self.right.check(B, H, Tq, Tk, device)


class Or(And):
    """Attend where either mask allows (tile kind: the larger of the two)."""

    def __init__(self, left: Mask, right: Mask):
        super().__init__(left, right)
        self.name = f"({left!r} | {right!r})"

    def predicate(self, b, h, q, k, Tq, Tk):
        return self.left.predicate(b, h, q, k, Tq, Tk) | self.right.predicate(b, h, q, k, Tq, Tk)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        return torch.maximum(
            self.left.tile_kinds(q_lo, q_hi, k_lo, k_hi, Tq, Tk).to(torch.int8),
            self.right.tile_kinds(q_lo, q_hi, k_lo, k_hi, Tq, Tk).to(torch.int8),
        )


class Not(Mask):
    """Attend where the inner mask does not (full and empty tiles swap)."""

    def __init__(self, inner: Mask):
        self.inner = inner
        self.name = f"~{inner!r}"

    @property
    def identity(self) -> tuple | None:
        return _identity_of("not", self.inner)

    def predicate(self, b, h, q, k, Tq, Tk):
        return ~self.inner.predicate(b, h, q, k, Tq, Tk)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        return FULL - self.inner.tile_kinds(q_lo, q_hi, k_lo, k_hi, Tq, Tk).to(torch.int8)

    @property
    def batch_size(self):
        return self.inner.batch_size

    @property
    def num_heads(self):
        return self.inner.num_heads

    @property
    def data_dependent(self) -> bool:
        return self.inner.data_dependent

    @property
    def unravels_grid(self) -> bool:
        return self.inner.unravels_grid

    def check(self, B, H, Tq, Tk, device):
        self.inner.check(B, H, Tq, Tk, device)


def row_counts(mask: Mask, Tq: int, Tk: int, device: torch.device | str = "cpu") -> Tensor:
    """Number of keys each query may attend to, ``[Bm, Hm, Tq]`` (int64).

    Uses the block structure: full tiles count their width, only partial tiles evaluate the
    predicate, so the cost is O(partial tiles × tile area), not O(Tq × Tk).
    """
    device = torch.device(device)

    def build() -> Tensor:
        structure = mask.blocks(Tq, Tk, device=device)
        bq, bk = structure.block_q, structure.block_k
        Bm, Hm = structure.kinds.shape[:2]
        counts = torch.zeros(Bm, Hm, Tq, dtype=torch.long, device=device)
        k_width = torch.clamp(Tk - torch.arange(structure.num_k_blocks, device=device) * bk, max=bk)
        b = torch.arange(Bm, device=device).view(-1, 1, 1, 1)
        h = torch.arange(Hm, device=device).view(1, -1, 1, 1)
        for i in range(structure.num_q_blocks):
            rows = slice(i * bq, min((i + 1) * bq, Tq))
            kinds = structure.kinds[:, :, i]  # [Bm, Hm, nk]
            counts[:, :, rows] += ((kinds == FULL) * k_width).sum(-1, keepdim=True)
            partial = (kinds == PARTIAL).flatten(0, 1).any(0).nonzero().flatten()
            if partial.numel() == 0:
                continue
            k = (partial[:, None] * bk + torch.arange(bk, device=device)).flatten()
            k = k[k < Tk]
            q = torch.arange(rows.start, rows.stop, device=device).view(1, 1, -1, 1)
            allowed = mask.predicate(b, h, q, k.view(1, 1, 1, -1), Tq, Tk)
            is_partial = (kinds == PARTIAL).repeat_interleave(bk, dim=-1)[..., :Tk]
            allowed = allowed & is_partial[..., k].unsqueeze(-2)
            counts[:, :, rows] += allowed.sum(-1)
        return counts

    return mask.cached(("row_counts", Tq, Tk, str(device)), build)
