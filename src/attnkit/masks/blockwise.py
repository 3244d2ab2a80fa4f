"""Block-level 1-D patterns: block-causal and chunked attention, shifted chunks (LongLoRA's
S²-Attn, SCCA), S2-Attention's head-wise strided shards and PowerAttention.

Positions are grouped into blocks of ``block_size`` consecutive tokens (query positions are
bottom-right aligned first, so query and key blocks live on one grid); the pattern is decided
per (query block, key block) pair, optionally intersected with token-level causality.
Every pattern here has an exact block structure for any tile size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit.masks._tiles import near_pairs
from attnkit.masks.base import EMPTY, Mask, aligned_query_positions
from attnkit.masks.patterns import _broadcast_index, _kinds


def _floordiv(a: Tensor, b: int | Tensor) -> Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _positive_int(value: int, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return int(value)


def _check_aligned(name: str, Tq: int, Tk: int) -> None:
    if Tq > Tk:
        raise ValueError(
            f"{name} needs Tq <= Tk (queries are the last Tq of the Tk positions), "
            f"got Tq={Tq}, Tk={Tk}"
        )


class BlockBand(Mask):
    """Query block ``i`` sees key block ``j`` iff ``lower <= j - i <= upper`` (None = unbounded),
    bidirectional inside the allowed blocks. Exact tiles: the block offsets of a tile form the
    interval ``[j_min - i_max, j_max - i_min]``."""

    def __init__(self, block_size: int, lower: int | None, upper: int | None, name: str):
        self.block, self.lower, self.upper, self.name = block_size, lower, upper, name

    @property
    def identity(self):
        return ("block_band", self.block, self.lower, self.upper)

    def check(self, B, H, Tq, Tk, device):
        super().check(B, H, Tq, Tk, device)
        _check_aligned(self.name, Tq, Tk)

    def _within(self, d_min: Tensor, d_max: Tensor) -> tuple[Tensor, Tensor]:
        full = torch.ones_like(d_min, dtype=torch.bool)
        empty = torch.zeros_like(d_min, dtype=torch.bool)
        if self.lower is not None:
            full, empty = full & (d_min >= self.lower), empty | (d_max < self.lower)
        if self.upper is not None:
            full, empty = full & (d_max <= self.upper), empty | (d_min > self.upper)
        return full, empty

    def predicate(self, b, h, q, k, Tq, Tk):
        d = _floordiv(k, self.block) - _floordiv(aligned_query_positions(q, Tq, Tk), self.block)
        full, _ = self._within(d, d)
        return full

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        _check_aligned(self.name, Tq, Tk)
        p_lo = _floordiv(aligned_query_positions(q_lo, Tq, Tk), self.block)
        p_hi = _floordiv(aligned_query_positions(q_hi, Tq, Tk), self.block)
        k_lo, k_hi = _floordiv(k_lo, self.block), _floordiv(k_hi, self.block)
        return _kinds(*self._within(k_lo - p_hi, k_hi - p_lo))


class ShiftedChunks(Mask):
    """Chunked attention with per-head shifts: query ``p`` sees key ``k`` iff
    ``(p + q_shift[h]) // chunk == (k + k_shift[h]) // chunk`` (and ``k <= p`` if causal).

    Shifting both (LongLoRA) moves the chunk borders; shifting only the keys (SCCA) makes a query
    chunk attend to a key chunk displaced by the shift. Shifts are taken modulo ``chunk`` and do
    not wrap around the sequence ends.

    Exact tiles: chunk ids are monotone in position, so a tile covers query chunks
    ``[cq0, cq1]`` and key chunks ``[ck0, ck1]``; non-causal it is empty iff they are disjoint
    and full iff both are one and the same chunk. Causal, a common chunk strictly inside both
    ranges always holds a pair ``k <= p``, so only the first two and the last common chunk need
    checking. Only tile pairs less than two chunks apart are classified (the rest are empty).
    """

    def __init__(self, chunk: int, q_shifts: Tensor, k_shifts: Tensor, causal: bool, name: str):
        self.chunk, self.causal, self.name = chunk, causal, name
        self.q_shifts = q_shifts.long() % chunk
        self.k_shifts = k_shifts.long() % chunk

    @property
    def num_heads(self) -> int:
        return self.q_shifts.numel()

    def check(self, B, H, Tq, Tk, device):
        super().check(B, H, Tq, Tk, device)
        _check_aligned(self.name, Tq, Tk)

    def _shifts(self, h: Tensor) -> tuple[Tensor, Tensor]:
        h = _broadcast_index(h, self.num_heads)
        return self.q_shifts.to(h.device)[h], self.k_shifts.to(h.device)[h]

    def predicate(self, b, h, q, k, Tq, Tk):
        p = aligned_query_positions(q, Tq, Tk)
        sq, sk = self._shifts(h)
        allowed = _floordiv(p + sq, self.chunk) == _floordiv(k + sk, self.chunk)
        return allowed & (k <= p) if self.causal else allowed

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        _check_aligned(self.name, Tq, Tk)
        # Heads with equal shifts share their tiles: classify each distinct pair once.
        pairs, head_to_pair = torch.unique(
            torch.stack([self.q_shifts, self.k_shifts], 1), dim=0, return_inverse=True
        )
        w = self.chunk
        sq = pairs[:, :1].to(q_lo.device)
        sk = pairs[:, 1:].to(q_lo.device)
        p_lo = aligned_query_positions(q_lo.flatten(), Tq, Tk)
        p_hi = aligned_query_positions(q_hi.flatten(), Tq, Tk)
        k_lo, k_hi = k_lo.flatten(), k_hi.flatten()
        # A query and a key of one chunk are less than two chunks apart.
        rows, cols = near_pairs(p_lo, p_hi, k_lo, k_hi, 2 * w)
        pl, ph, kl, kh = p_lo[rows], p_hi[rows], k_lo[cols], k_hi[cols]  # [P] tile pairs
        cq0, cq1 = _floordiv(pl + sq, w), _floordiv(ph + sq, w)  # [U, P]
        ck0, ck1 = _floordiv(kl + sk, w), _floordiv(kh + sk, w)
        first, last = torch.maximum(cq0, ck0), torch.minimum(cq1, ck1)
        full = (cq0 == cq1) & (ck0 == ck1) & (cq0 == ck0)
        if not self.causal:
            pair_kinds = _kinds(full, first > last)
        else:
            nonempty = torch.zeros_like(full)
            for c in (first, first + 1, last):
                lowest_key = torch.maximum(kl, c * w - sk)
                highest_query = torch.minimum(ph, (c + 1) * w - sq - 1)
                nonempty |= (c >= first) & (c <= last) & (lowest_key <= highest_query)
            pair_kinds = _kinds(full & (kh <= pl), ~nonempty)
        kinds = torch.full(
            (pairs.shape[0], p_lo.numel(), k_lo.numel()),
            EMPTY,
            dtype=torch.int8,
            device=p_lo.device,
        )
        kinds[:, rows, cols] = pair_kinds
        return kinds[head_to_pair.to(kinds.device)].unsqueeze(0)


class BlockMatrixPattern(Mask):
    """A causal pattern given by a boolean matrix over (query block, key block) pairs, per head,
    intersected with token causality (``k <= p``).

    Subclasses implement ``allowed_blocks(h, qb, kb)`` with broadcasting tensor ops.

    Exact tiles from 2-D prefix sums of the block matrix ``M [Hm, nb, nb]`` (``nb =
    ceil(Tk / block)``): a tile covers the block rectangle ``[qb0, qb1] × [kb0, kb1]``; it is
    full iff every block of the rectangle is allowed and its last key precedes its first query;
    every block strictly below the diagonal holds a pair ``k <= p`` and so does every diagonal
    block of the rectangle when ``k_lo <= p_hi``, so the tile is empty iff ``M & (kb <= qb)``
    has no block in the rectangle. Building costs O(P · nb²) for the ``P``
    distinct head patterns (``head_classes``), once per size (cached by ``Mask.blocks``).
    """

    block: int

    def allowed_blocks(self, h: Tensor, qb: Tensor, kb: Tensor) -> Tensor:
        raise NotImplementedError

    def head_classes(self) -> Tensor:
        """``[Hm]`` ids; heads with equal ids have equal patterns (their tiles are built once)."""
        return torch.arange(self.num_heads)

    def check(self, B, H, Tq, Tk, device):
        super().check(B, H, Tq, Tk, device)
        _check_aligned(self.name, Tq, Tk)

    def predicate(self, b, h, q, k, Tq, Tk):
        p = aligned_query_positions(q, Tq, Tk)
        allowed = self.allowed_blocks(h, _floordiv(p, self.block), _floordiv(k, self.block))
        return allowed & (k <= p)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        _check_aligned(self.name, Tq, Tk)
        device = q_lo.device
        nb = -(-Tk // self.block)
        blocks = torch.arange(nb, device=device)
        classes, head_to_class = torch.unique(self.head_classes(), return_inverse=True)
        first_head = torch.full((classes.numel(),), self.num_heads, dtype=torch.long)
        first_head.scatter_reduce_(0, head_to_class, torch.arange(self.num_heads), "amin")
        heads = first_head.to(device).view(-1, 1, 1)
        qb, kb = blocks.view(1, -1, 1), blocks.view(1, 1, -1)
        allowed = self.allowed_blocks(heads, qb, kb).expand(classes.numel(), nb, nb)
        p_lo = aligned_query_positions(q_lo.flatten(), Tq, Tk)
        p_hi = aligned_query_positions(q_hi.flatten(), Tq, Tk)
        k_lo, k_hi = k_lo.flatten(), k_hi.flatten()
        rows = (_floordiv(p_lo, self.block), _floordiv(p_hi, self.block) + 1)
        cols = (_floordiv(k_lo, self.block), _floordiv(k_hi, self.block) + 1)
        area = (rows[1] - rows[0]).view(-1, 1) * (cols[1] - cols[0]).view(1, -1)
        full = (_rectangle_counts(allowed, rows, cols) == area) & (
            k_hi.view(1, -1) <= p_lo.view(-1, 1)
        )
        lower = _rectangle_counts(allowed & (kb <= qb), rows, cols)
        empty = (lower == 0) | (k_lo.view(1, -1) > p_hi.view(-1, 1))
        return _kinds(full, empty)[head_to_class.to(device)].unsqueeze(0)


def _rectangle_counts(
    matrix: Tensor, rows: tuple[Tensor, Tensor], cols: tuple[Tensor, Tensor]
) -> Tensor:
    """Number of True entries of ``matrix [H, n, n]`` in each rectangle ``rows × cols``
    (half-open bounds), ``[H, len(rows), len(cols)]``."""
    table = torch.nn.functional.pad(
        matrix.to(torch.int32).cumsum(1, dtype=torch.int32).cumsum(2, dtype=torch.int32),
        (1, 0, 1, 0),
    )

    def at(r: Tensor, c: Tensor) -> Tensor:
        return table[:, r][:, :, c]

    return at(rows[1], cols[1]) - at(rows[0], cols[1]) - at(rows[1], cols[0]) + at(rows[0], cols[0])


class StridedShards(BlockMatrixPattern):
    """S2-Attention's local-stride pattern (DKernel): causal; query block ``i`` of head ``h``
    sees key block ``j <= i`` iff ``i - j < local_blocks`` or
    ``(j + phase(h)) % vert_stride == 0`` with ``phase(h) = kv_head(h) * step + offset``, or
    head ``h``'s KV head is one of the last ``dense_heads`` (full causal)."""

    def __init__(
        self,
        block: int,
        local_blocks: int,
        vert_stride: int,
        num_heads: int,
        num_kv_heads: int,
        dense_heads: int,
        head_offset: int,
    ):
        self.block, self.local_blocks, self.vert_stride = block, local_blocks, vert_stride
        self._heads, self.group = num_heads, num_heads // num_kv_heads
        self.sparse_kv_heads = num_kv_heads - dense_heads
        self.step = max(1, vert_stride // num_kv_heads)
        self.head_offset = head_offset
        self.name = (
            f"s2_attention(block={block}, local={local_blocks}, stride={vert_stride}, "
            f"heads={num_heads}/{num_kv_heads}, dense={dense_heads})"
        )

    @property
    def num_heads(self) -> int:
        return self._heads

    def head_classes(self) -> Tensor:
        kv_head = torch.arange(self._heads) // self.group
        phase = (kv_head * self.step + self.head_offset) % self.vert_stride
        return torch.where(kv_head >= self.sparse_kv_heads, -1, phase)

    def allowed_blocks(self, h, qb, kb):
        kv_head = _floordiv(_broadcast_index(h, self._heads), self.group)
        d = qb - kb
        phase = kv_head * self.step + self.head_offset
        strided = (kb + phase) % self.vert_stride == 0
        dense = kv_head >= self.sparse_kv_heads
        return (d >= 0) & ((d < self.local_blocks) | strided | dense)


class PowerBlocks(BlockMatrixPattern):
    """PowerAttention's block pattern: causal; query block ``i`` sees key block ``j`` iff
    ``i - j`` is 0 or a power of two, or ``i - j < local_blocks``, or ``j < sink_blocks``."""

    def __init__(self, block: int, local_blocks: int, sink_blocks: int):
        self.block, self.local_blocks, self.sink_blocks = block, local_blocks, sink_blocks
        self.name = f"power_attention(block={block}, local={local_blocks}, sinks={sink_blocks})"

    def allowed_blocks(self, h, qb, kb):
        d = qb - kb
        power_of_two = (d > 0) & (torch.bitwise_and(d, d - 1) == 0)
        return (d >= 0) & ((d < self.local_blocks) | power_of_two | (kb < self.sink_blocks))


# -- public factories ---------------------------------------------------------------------


def block_causal(block_size: int) -> Mask:
    """Block-causal attention: bidirectional inside each block of ``block_size`` positions,
    causal between blocks (query block ``i`` sees key blocks ``0..i``).

    The frame-wise mask of autoregressive video diffusion ("Next-Frame Diffusion", Cheng et al.,
    2025: all tokens of the next frame are generated in parallel) and of Inf-DiT's
    unidirectional block attention (Yang et al., 2024) in its 1-D form. Blocks are counted on
    the key axis with bottom-right aligned queries. ``block_size=1`` is ``causal()``.
    """
    block_size = _positive_int(block_size, "block_size")
    return BlockBand(block_size, None, 0, f"block_causal({block_size})")


def chunked(block_size: int, causal: bool = False) -> Mask:
    """Chunked (local-block) attention: a query sees only the keys of its own block of
    ``block_size`` positions; with ``causal`` only those at or before it (Llama 4's chunked
    attention; the local stage of "Block Transformer: Global-to-Local Language Modeling for
    Fast Inference", Ho et al., 2024). ``chunked(T)`` is ``full()`` (or ``causal()``)."""
    block_size = _positive_int(block_size, "block_size")
    zero = torch.zeros(1, dtype=torch.long)
    name = f"chunked({block_size}{', causal' if causal else ''})"
    return ShiftedChunks(block_size, zero, zero, bool(causal), name)


def _head_shifts(shifts: Sequence[int] | Tensor, what: str) -> Tensor:
    shifts = torch.as_tensor(shifts)
    if shifts.dim() != 1 or shifts.numel() == 0 or shifts.dtype.is_floating_point:
        raise ValueError(f"{what} must be one integer shift per head, got {shifts.tolist()}")
    return shifts.long()


def shifted_chunks(
    chunk_size: int,
    shifts: Sequence[int] | Tensor,
    *,
    shift_queries: bool = False,
    causal: bool = True,
) -> Mask:
    """Chunked attention whose chunk borders are shifted per head (``shifts``: one per head).

    Head ``h`` lets query ``p`` see key ``k`` iff ``(p + s_q) // chunk_size ==
    (k + shifts[h]) // chunk_size`` with ``s_q = shifts[h]`` if ``shift_queries`` else 0, and
    ``k <= p`` when ``causal`` (on the original positions). Shifting keys only is SCCA's
    "shifted cross chunk" attention: query chunk ``c`` attends to the keys
    ``[c·w - s, (c+1)·w - s)``; shifting both is LongLoRA's shifted groups. Shifts do not wrap
    around the sequence (a cyclic roll would let the first tokens see the last ones).
    """
    chunk_size = _positive_int(chunk_size, "chunk_size")
    k_shifts = _head_shifts(shifts, "shifts")
    q_shifts = k_shifts if shift_queries else torch.zeros_like(k_shifts)
    name = (
        f"shifted_chunks({chunk_size}, shifts={k_shifts.tolist()}"
        f"{', queries' if shift_queries else ''}{', causal' if causal else ''})"
    )
    return ShiftedChunks(chunk_size, q_shifts, k_shifts, bool(causal), name)


#: SCCA's head-shift schedules: head index, head count and chunk -> key shift.
SCCA_PATTERNS = {
    "fixed": lambda h, heads, chunk: (chunk // 2) * int(h >= heads // 2),
    "flow": lambda h, heads, chunk: (h * chunk) // heads,
}


def scca(chunk_size: int, num_heads: int, pattern: str = "fixed", causal: bool = True) -> Mask:
    """SCCA: shifted cross-chunk attention ("SCCA: Shifted Cross Chunk Attention for long
    contextual semantic expansion", Guo, 2023).

    Queries stay in their chunks of ``chunk_size``; the keys/values of each head are shifted so
    that a query chunk attends to a displaced key chunk (``shifted_chunks`` with
    ``shift_queries=False``). ``pattern="fixed"``: the second half of the heads shifts by half a
    chunk; ``pattern="flow"``: head ``h`` shifts by ``h · chunk_size // num_heads``, so the
    heads' key chunks start at evenly spaced offsets. [ext: both schedules as read from the
    paper's description; shifts do not wrap around the sequence.]
    """
    if pattern not in SCCA_PATTERNS:
        raise ValueError(f"scca pattern must be one of {sorted(SCCA_PATTERNS)}, got {pattern!r}")
    num_heads = _positive_int(num_heads, "num_heads")
    chunk_size = _positive_int(chunk_size, "chunk_size")
    shifts = [SCCA_PATTERNS[pattern](h, num_heads, chunk_size) for h in range(num_heads)]
    mask = shifted_chunks(chunk_size, shifts, causal=causal)
    mask.name = f"scca({chunk_size}, {pattern}, heads={num_heads})"
    return mask


def longlora_shift(group_size: int, num_heads: int, causal: bool = True) -> Mask:
    """LongLoRA's shifted sparse attention S²-Attn ("LongLoRA: Efficient Fine-tuning of
    Long-Context Large Language Models", Chen et al., 2024).

    Attention runs inside groups of ``group_size`` tokens; the second half of the heads uses
    groups shifted by half a group, so information crosses group borders. LongLoRA implements
    the shift with a cyclic roll, which under a causal mask lets the first half-group see the
    last one; here the shifted groups are cut at the sequence ends instead (the first and last
    shifted groups hold half a group).
    """
    group_size = _positive_int(group_size, "group_size")
    num_heads = _positive_int(num_heads, "num_heads")
    if group_size % 2 or num_heads % 2:
        raise ValueError(
            f"longlora_shift shifts half of the heads by half a group: group_size "
            f"({group_size}) and num_heads ({num_heads}) must be even"
        )
    shifts = [group_size // 2 * int(h >= num_heads // 2) for h in range(num_heads)]
    mask = shifted_chunks(group_size, shifts, shift_queries=True, causal=causal)
    mask.name = f"longlora_shift({group_size}, heads={num_heads})"
    return mask


def s2_attention(
    num_heads: int,
    block_size: int = 64,
    local_blocks: int = 4,
    vert_stride: int = 4,
    *,
    num_kv_heads: int | None = None,
    dense_heads: int = 0,
    head_offset: int = 0,
) -> Mask:
    """S2-Attention: head-wise strided context shards ("S2-Attention: Hardware-Aware Context
    Sharding Among Attention Heads", Lin et al., 2024), with DKernel's local-stride pattern.

    Causal. Keys are grouped in blocks of ``block_size``; query block ``i`` of head ``h`` sees
    key block ``j <= i`` if ``i - j < local_blocks`` (a dense local window in every head) or
    ``(j + h_kv · step + head_offset) % vert_stride == 0`` (the head's shard: every
    ``vert_stride``-th block, at a phase that differs per head), with ``h_kv`` the KV head of
    query head ``h`` (query heads of one KV head share a pattern, so the KV cache stays compact)
    and ``step = max(1, vert_stride // num_kv_heads)``. The last ``dense_heads`` KV heads attend
    densely (causal). With ``num_kv_heads >= vert_stride`` the union over heads is the whole
    causal context. [ext: DKernel's ``get_sparse_attn_mask``, whose step divides by the query
    head count; here by the KV head count, which is the same without GQA.]
    """
    num_heads = _positive_int(num_heads, "num_heads")
    num_kv_heads = num_heads if num_kv_heads is None else _positive_int(num_kv_heads, "kv heads")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}) (GQA groups)"
        )
    if not 0 <= dense_heads <= num_kv_heads:
        raise ValueError(f"dense_heads must be in [0, {num_kv_heads}], got {dense_heads}")
    return StridedShards(
        _positive_int(block_size, "block_size"),
        _positive_int(local_blocks, "local_blocks"),
        _positive_int(vert_stride, "vert_stride"),
        num_heads,
        num_kv_heads,
        int(dense_heads),
        int(head_offset),
    )


def power_attention(block_size: int = 64, local_blocks: int = 1, sink_blocks: int = 0) -> Mask:
    """PowerAttention ("PowerAttention: Exponentially Scaling of Receptive Fields for Effective
    Sparse Attention", Chen et al., 2025): causal; query block ``i`` attends to key block
    ``i - d`` for ``d = 0`` and every power of two ``d = 1, 2, 4, 8, ...``, so after ``L``
    layers a token reaches ``2^L`` blocks back with a complete receptive field, at a cost of
    ``O(log T)`` blocks per query. ``local_blocks`` widens the dense local window to the last
    ``local_blocks`` blocks and ``sink_blocks`` adds the first blocks (sinks). [ext: block-level
    form with optional window and sinks, as the paper's figures show the pattern on blocks.]
    """
    if isinstance(sink_blocks, bool) or int(sink_blocks) != sink_blocks or sink_blocks < 0:
        raise ValueError(f"sink_blocks must be an int >= 0, got {sink_blocks!r}")
    return PowerBlocks(
        _positive_int(block_size, "block_size"),
        _positive_int(local_blocks, "local_blocks"),
        int(sink_blocks),
    )
