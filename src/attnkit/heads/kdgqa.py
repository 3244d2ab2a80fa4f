"""KDGQA / DGQA: query heads allocated to KV groups in proportion to the key heads' norms.

"Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention" (Khan, Khaquan,
Tafveez, Samiwala, Raza, 2024). GQA gives every key/value head ``Hq / Hkv`` query heads; here
the group sizes follow the key heads' norms:

    n_g   = sum_b || K_g[b] ||_F                       (norm over tokens and head dims)
    n^_g  = (n_g - min n) / (max n - min n)            (min-max scaling, as in the paper)
    a_g   = round(n^_g / sum n^ * Hq)                  (round half to even)

then, while ``sum a > Hq``, the largest group loses one query head, and while ``sum a < Hq``
the smallest gains one (the authors' KDGQA code; first index on ties, so the rule is
deterministic). Query heads are assigned in order: the first ``a_0`` to KV head 0, the next
``a_1`` to KV head 1, ... The paper does not guarantee every group a query head, and min-max
scaling gives the smallest-norm group none before the correction; a KV head may go unused.

- KDGQA (``KeyDrivenGQA``) recomputes the allocation from this call's keys on every forward.
- DGQA (``DynamicKeyDrivenGQA``) allocates from an exponential moving average of the norms,
  updated in training mode (``ema <- decay * ema + (1 - decay) * n``; the first update sets
  it) and frozen in eval mode. The authors' code weighs the new norms by 0.9
  (``ema_decay=0.1`` reproduces it) and also has a variant on norm differences, not included.

Exact reduction: equal norms (all within ``tie_tolerance`` of each other, relative) give the
standard GQA grouping ``Hq / Hkv`` per group, so the layout equals ``GroupedQueryAttention``
with the same weights. The tolerance exists because min-max scaling turns rounding noise
between nearly equal norms into an arbitrary allocation. The paper's perturbed variant (PGQA)
is not included.

Both regroup query heads per call, so neither runs through a KV cache (the cache would hold
keys grouped for another allocation); they need a plain ``Attend``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.attend import Attend
from attnkit.heads.base import Rotary, default_positions, rotate, softmax_head
from attnkit.heads.gqa import GroupedQueryAttention


def key_head_norms(k: Tensor) -> Tensor:
    """``k [B, T, Hkv, D]`` -> ``[Hkv]`` float64: each key head's Frobenius norm over tokens
    and head dims, summed over the batch (no gradient: the allocation is discrete), as in
    Khan et al. (2024)."""
    return torch.linalg.vector_norm(k.detach().double(), dim=(1, 3)).sum(0)


def allocate_query_heads(norms: Tensor, n_heads: int, tie_tolerance: float = 1e-6) -> list[int]:
    """Query heads per KV group from the key-head norms ``[Hkv]`` (Khan et al., 2024; module
    docstring); sums to ``n_heads``. Norms equal within ``tie_tolerance * max`` give
    ``n_heads / Hkv`` each."""
    norms = norms.detach().double().cpu()
    G = norms.numel()
    spread = (norms.max() - norms.min()).item()
    if spread <= tie_tolerance * norms.abs().max().item():
        if n_heads % G:
            raise ValueError(f"n_heads={n_heads} is not a multiple of the {G} key/value heads")
        return [n_heads // G] * G
    scaled = (norms - norms.min()) / spread
    sizes = torch.round(scaled / scaled.sum() * n_heads).long()
    while sizes.sum() > n_heads:
        sizes[sizes.argmax()] -= 1
    while sizes.sum() < n_heads:
        sizes[sizes.argmin()] += 1
    return sizes.tolist()


def group_index(sizes: list[int], device: torch.device | str = "cpu") -> Tensor:
    """KV head of each query head for group sizes ``[a_0, a_1, ...]``: ``[Hq]`` int64 (query
    heads assigned in order, as in Khan et al., 2024)."""
    counts = torch.tensor(sizes, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)


class KeyDrivenGQA(GroupedQueryAttention):
    """KDGQA (Khan et al., 2024, "Beyond Uniform Query Distribution: Key-Driven Grouped Query
    Attention") on GQA projections: ``[B, T, C] -> [B, T, Hq, D]``, groups re-allocated from
    this call's key norms. ``last_group_sizes`` holds the allocation of the last forward.

    Args: as ``GroupedQueryAttention``, plus ``tie_tolerance`` (relative spread of the norms
    below which they count as equal: standard GQA grouping).
    """

    supports_kv_cache = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
        tie_tolerance: float = 1e-6,
    ):
        super().__init__(d_model, n_heads, head_dim, n_kv_heads=n_kv_heads, bias=bias)
        if not tie_tolerance >= 0:
            raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
        self.tie_tolerance = tie_tolerance
        self.last_group_sizes: list[int] | None = None

    def group_sizes(self, k: Tensor) -> list[int]:
        """Query heads per KV head for keys ``k [B, T, Hkv, D]``."""
        return allocate_query_heads(key_head_norms(k), self.n_heads, self.tie_tolerance)

    def forward(
        self,
        x: Tensor,
        attend: Attend,
        rotary: Rotary | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        attend = self.check_plain_attend(attend)
        q, k, v = self.qkv(x, rotary, positions)
        self.last_group_sizes = self.group_sizes(k)
        index = group_index(self.last_group_sizes, x.device)
        return attend(q, k.index_select(2, index), v.index_select(2, index))


class DynamicKeyDrivenGQA(KeyDrivenGQA):
    """DGQA (Khan et al., 2024): KDGQA allocating from an EMA of the key norms (buffer
    ``norm_ema [Hkv]``, updated in training mode only; before any update the norms count as
    equal: GQA grouping).

    Args: as ``KeyDrivenGQA``, plus ``ema_decay`` in [0, 1).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
        tie_tolerance: float = 1e-6,
        ema_decay: float = 0.9,
    ):
        super().__init__(
            d_model,
            n_heads,
            head_dim,
            n_kv_heads=n_kv_heads,
            bias=bias,
            tie_tolerance=tie_tolerance,
        )
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self.register_buffer("norm_ema", torch.zeros(self.n_kv_heads, dtype=torch.float64))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def group_sizes(self, k: Tensor) -> list[int]:
        if self.training:
            norms = key_head_norms(k).to(self.norm_ema.device)
            decay = self.ema_decay if self.ema_updates.item() else 0.0
            self.norm_ema.mul_(decay).add_((1 - decay) * norms)
            self.ema_updates.add_(1)
        return allocate_query_heads(self.norm_ema, self.n_heads, self.tie_tolerance)


def kdgqa_reference(
    x: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    group_sizes: list[int] | None = None,
    rotary: Rotary | None = None,
    positions: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """KDGQA as in Khan et al. (2024), group by group: ``[B, T, Hq, D]``. ``group_sizes``
    (query heads per KV head) default to the allocation from this call's key norms."""
    D = q_weight.shape[0] // n_heads
    positions = default_positions(x, positions)

    def head(weight: Tensor, i: int) -> Tensor:
        return x @ weight[i * D : (i + 1) * D].T

    def rope(t: Tensor) -> Tensor:
        return rotate(rotary, t.unsqueeze(2), positions).squeeze(2)

    keys = [rope(head(k_weight, g)) for g in range(n_kv_heads)]
    values = [head(v_weight, g) for g in range(n_kv_heads)]
    if group_sizes is None:
        norms = torch.stack(
            [sum(key[b].detach().double().norm() for b in range(len(key))) for key in keys]
        )
        group_sizes = allocate_query_heads(norms, n_heads)
    outputs, h = [], 0
    for g, size in enumerate(group_sizes):
        for _ in range(size):
            outputs.append(softmax_head(rope(head(q_weight, h)), keys[g], values[g], causal))
            h += 1
    return torch.stack(outputs, dim=2)
