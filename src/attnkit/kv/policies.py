"""KV eviction policies: which keys and values each KV head keeps after a call.

A policy sees a ``StepView`` of one layer after the call's attention — every (batch row, KV head)
as a row of slots, oldest first — and returns the slots to keep. The cache stores exactly those
(``attnkit.kv.KVCache``: per-head variable lengths, so evicting frees memory). Statistics come
from ``attnkit.Aux(key_sums=...)``: a policy names the queries whose attention it needs
(``queries``) and reads the per-key sums, never a ``Tq × Tk`` matrix.

Every policy has a vectorised ``keep`` and a ``reference`` written per head as a loop that reads
like its paper; tests check that they agree. With a budget no smaller than the context every
policy keeps everything and equals ``FullCache`` exactly. Budgets follow ``attnkit.kv.budget``:
an int (tokens), a fraction in ``(0, 1]`` of the context, per layer or per (layer, KV head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.kv.budget import Budget, BudgetSpec, pyramid


@dataclass(frozen=True)
class StepView:
    """One layer's cache after a call's attention, as policies see it.

    Rows are (batch row, KV head) pairs, ``[B, Hkv, L]``; slots hold keys oldest first and are
    right-aligned (a head holding fewer keys has empty slots on the left).

    Attributes:
        layer: the layer index.
        positions: original token position of each slot, ``[B, Hkv, L]`` int64 (-1: empty).
        attendable: ``[B, Hkv, L]`` bool: the slot holds a key queries may see (not empty, not
            padding). A policy keeps a subset of these.
        scores: attention each key has received, summed over its group's query heads and over
            every query the policy asked for so far (``queries``), ``[B, Hkv, L]`` float32.
        key_sums: this call's part of ``scores`` (None if the policy asked for no queries).
        new_tokens: keys this call appended (its last ``new_tokens`` slots).
        seen: tokens the layer has seen, this call included.
        context: tokens seen at the end of the layer's first call (fractional budgets).
        first_call: True for the layer's first call (the prompt).
    """

    layer: int
    positions: Tensor
    attendable: Tensor
    scores: Tensor
    key_sums: Tensor | None
    new_tokens: int
    seen: int
    context: int
    first_call: bool

    @property
    def num_kv_heads(self) -> int:
        return self.positions.shape[1]

    def rank_from_oldest(self) -> Tensor:
        """``[B, Hkv, L]``: 0 for each row's oldest attendable key, 1 for the next, ..."""
        return self.attendable.long().cumsum(-1) - 1

    def rank_from_newest(self) -> Tensor:
        """``[B, Hkv, L]``: 0 for each row's newest attendable key, 1 for the one before, ..."""
        count = self.attendable.sum(-1, keepdim=True)
        return count - 1 - self.rank_from_oldest()

    def count(self) -> Tensor:
        """Attendable keys per row, ``[B, Hkv]``."""
        return self.attendable.sum(-1)


class Policy(Protocol):
    """What ``KVCache`` needs from a policy."""

    name: str

    def check(self, num_layers: int | None, num_kv_heads: int) -> None:
        """Raise ``ValueError`` if the policy does not fit a model of these sizes."""
        ...

    def queries(self, layer: int, num_queries: int, first_call: bool) -> slice | None:
        """The queries of this call whose attention the policy needs summed per key
        (``Aux(key_sums=...)``), or None."""
        ...

    def keep(self, view: StepView) -> Tensor:
        """Bool ``[B, Hkv, L]``: the attendable slots to keep."""
        ...

    def reference(self, view: StepView) -> Tensor:
        """The same as ``keep``, written per head as the paper states it."""
        ...


def select(view: StepView, budget: Tensor, forced: Tensor, priority: Tensor | None) -> Tensor:
    """Keep at most ``budget[h]`` keys per row: all of them if the row holds no more, else the
    ``forced`` ones (sinks, recent window, observation window) and, with the rest of the budget,
    the highest ``priority`` among the others (ties go to the older key).

    ``budget`` ``[Hkv]`` int64; ``forced`` ``[B, Hkv, L]`` bool, at most ``budget`` per row;
    ``priority`` ``[B, Hkv, L]`` or None (keep only the forced ones).
    """
    attendable = view.attendable
    budget = budget.to(attendable.device).view(1, -1)
    forced = forced & attendable
    fits = view.count() <= budget
    if priority is None:
        chosen = torch.zeros_like(attendable)
    else:
        free = (budget - forced.sum(-1)).clamp_min(0)
        candidates = attendable & ~forced
        ranked = priority.float().masked_fill(~candidates, float("-inf"))
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
        )
        chosen = candidates & (rank < free.unsqueeze(-1))
    return attendable & (fits.unsqueeze(-1) | forced | chosen)


def _reference_select(
    view: StepView, budget: Tensor, forced: Tensor, priority: Tensor | None
) -> Tensor:
    """``select`` as a loop over rows: the oracle for every policy's reference."""
    keep = torch.zeros_like(view.attendable)
    B, H, _ = keep.shape
    for b in range(B):
        for h in range(H):
            slots = view.attendable[b, h].nonzero().flatten().tolist()
            if len(slots) <= int(budget[h]):
                keep[b, h, slots] = True
                continue
            must = [j for j in slots if forced[b, h, j]]
            rest = [j for j in slots if not forced[b, h, j]]
            free = int(budget[h]) - len(must)
            if priority is not None and free > 0:
                # sorted() is stable: equal priorities keep the older key first
                rest = sorted(rest, key=lambda j: -float(priority[b, h, j]))
                must += rest[:free]
            keep[b, h, must] = True
    return keep


def _check_minimum(budget: Tensor, minimum: int, policy: str, why: str) -> None:
    if int(budget.min()) < minimum:
        raise ValueError(
            f"{policy}: budget {budget.tolist()} tokens is below the {minimum} it always keeps "
            f"({why}); raise the budget"
        )


# -- the policies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FullCache:
    """Keep every key and value: the exact reference every policy reduces to with an unlimited
    budget (only padding keys, which no query can see, are not stored)."""

    name: str = "full"

    def check(self, num_layers: int | None, num_kv_heads: int) -> None:
        return None

    def queries(self, layer: int, num_queries: int, first_call: bool) -> slice | None:
        return None

    def keep(self, view: StepView) -> Tensor:
        return view.attendable

    def reference(self, view: StepView) -> Tensor:
        return view.attendable.clone()


@dataclass(frozen=True)
class StreamingLLM:
    """Attention sinks + a recent window ("Efficient Streaming Language Models with Attention
    Sinks", Xiao, Tian, Chen, Han, Lewis, 2024).

    Each head keeps its first ``sinks`` tokens and its most recent ``budget - sinks`` tokens,
    evicting the oldest non-sink token at every step, so memory and per-step cost stay constant.
    Decoding token by token with ``budget = sinks + w``, each query sees the sinks, the last
    ``w`` keys and itself — exactly the mask ``causal() & (sinks(sinks) | sliding_window(w))``.

    Positions: keys are stored already rotated, at their original positions. The paper instead
    caches keys before RoPE and rotates them by their slot in the cache, so positions never
    exceed the cache size; the two agree while the sequence stays within the model's trained
    length (every test and benchmark here), and only the paper's re-indexing extends beyond it.

    Args:
        budget: tokens per head, sinks included (must exceed ``sinks``).
        sinks: attention-sink tokens kept from the start of each sequence.
    """

    budget: BudgetSpec | Budget
    sinks: int = 4
    name: str = "streaming_llm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", Budget.of(self.budget))
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if not self.budget.fraction:
            self._check(self.budget.values.flatten().long())

    def _check(self, budget: Tensor) -> None:
        _check_minimum(budget, self.sinks + 1, self.name, f"{self.sinks} sinks + 1 recent token")

    def check(self, num_layers: int | None, num_kv_heads: int) -> None:
        if num_layers is not None:
            self.budget.check(num_layers, num_kv_heads)

    def queries(self, layer: int, num_queries: int, first_call: bool) -> slice | None:
        return None

    def _budget(self, view: StepView) -> Tensor:
        budget = self.budget.tokens(view.layer, view.num_kv_heads, view.context)
        self._check(budget)
        return budget

    def keep(self, view: StepView) -> Tensor:
        budget = self._budget(view).to(view.positions.device)
        window = (budget - self.sinks).view(1, -1, 1)
        forced = (view.rank_from_oldest() < self.sinks) | (view.rank_from_newest() < window)
        return select(view, budget, forced, None)

    def reference(self, view: StepView) -> Tensor:
        budget = self._budget(view)
        keep = torch.zeros_like(view.attendable)
        B, H, _ = keep.shape
        for b in range(B):
            for h in range(H):
                slots = view.attendable[b, h].nonzero().flatten().tolist()
                window = int(budget[h]) - self.sinks
                kept = (
                    slots if len(slots) <= int(budget[h]) else slots[: self.sinks] + slots[-window:]
                )
                keep[b, h, kept] = True
        return keep


@dataclass(frozen=True)
class H2O:
    """Heavy hitters + recent tokens ("H2O: Heavy-Hitter Oracle for Efficient Generative
    Inference of Large Language Models", Zhang et al., 2023).

    Every key accumulates the attention it receives from every query (the prompt's and each
    generated token's, summed over the query heads of its KV group). Each head keeps its
    ``ceil(recent * budget)`` most recent keys and, with the rest of the budget, the keys with the
    largest accumulated attention; at each step the lowest-scoring other key is evicted
    (greedily, as in the paper).

    Args:
        budget: tokens per head.
        recent: fraction of the budget reserved for the most recent tokens (the paper's
            default splits the budget evenly between heavy hitters and recent tokens).
    """

    budget: BudgetSpec | Budget
    recent: float = 0.5
    name: str = "h2o"

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", Budget.of(self.budget))
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must be a fraction in [0, 1], got {self.recent}")

    def check(self, num_layers: int | None, num_kv_heads: int) -> None:
        if num_layers is not None:
            self.budget.check(num_layers, num_kv_heads)

    def queries(self, layer: int, num_queries: int, first_call: bool) -> slice | None:
        return slice(None)

    def _split(self, view: StepView) -> tuple[Tensor, Tensor]:
        budget = self.budget.tokens(view.layer, view.num_kv_heads, view.context)
        recent = torch.ceil(budget.double() * self.recent).long()
        return budget, recent

    def keep(self, view: StepView) -> Tensor:
        budget, recent = self._split(view)
        forced = view.rank_from_newest() < recent.to(view.positions.device).view(1, -1, 1)
        return select(view, budget, forced, view.scores)

    def reference(self, view: StepView) -> Tensor:
        budget, recent = self._split(view)
        forced = torch.zeros_like(view.attendable)
        B, H, _ = forced.shape
        for b in range(B):
            for h in range(H):
                slots = view.attendable[b, h].nonzero().flatten().tolist()
                if int(recent[h]):
                    forced[b, h, slots[-int(recent[h]) :]] = True
        return _reference_select(view, budget, forced, view.scores)


@dataclass(frozen=True)
class SnapKV:
    """Observation-window voting at the end of the prompt ("SnapKV: LLM Knows What You are
    Looking for Before Generation", Li et al., 2024).

    After the prompt, the last ``window`` queries vote: each prompt key gets the attention those
    queries give it (summed over the query heads of its KV group), the votes are smoothed with a
    1-D max-pool of width ``kernel`` (keeping clusters of neighbours around important tokens),
    and each head keeps its ``budget - window`` most-voted prompt keys plus the window's own
    keys. Generated tokens are appended without further eviction, as in the paper.

    Args:
        budget: prompt tokens kept per head, observation window included (must exceed
            ``window``). Use ``pyramid_kv`` for PyramidKV's per-layer budgets.
        window: observation window (last prompt queries); the paper's experiments use 32.
        kernel: pooling width (odd); SnapKV's code uses 5-7 and offers max or average
            pooling, max pooling here.
    """

    budget: BudgetSpec | Budget
    window: int = 32
    kernel: int = 7
    name: str = "snapkv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", Budget.of(self.budget))
        if self.window < 1:
            raise ValueError(f"SnapKV window must be >= 1 query, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV kernel must be an odd width >= 1, got {self.kernel}")
        if not self.budget.fraction:
            self._check(self.budget.values.flatten().long())

    def _check(self, budget: Tensor) -> None:
        _check_minimum(budget, self.window, self.name, "the observation window, or shrink window")

    def check(self, num_layers: int | None, num_kv_heads: int) -> None:
        if num_layers is not None:
            self.budget.check(num_layers, num_kv_heads)

    def queries(self, layer: int, num_queries: int, first_call: bool) -> slice | None:
        return slice(-self.window, None) if first_call else None

    def _plan(self, view: StepView) -> tuple[Tensor, Tensor, Tensor]:
        budget = self.budget.tokens(view.layer, view.num_kv_heads, view.context)
        self._check(budget)
        window = view.rank_from_newest() < self.window
        votes = view.key_sums.masked_fill(~view.attendable | window, 0.0)
        pooled = F.max_pool1d(
            votes.flatten(0, 1).unsqueeze(1), self.kernel, stride=1, padding=self.kernel // 2
        ).view_as(votes)
        return budget, window, pooled

    def keep(self, view: StepView) -> Tensor:
        if not view.first_call:
            return view.attendable
        budget, window, pooled = self._plan(view)
        return select(view, budget, window, pooled)

    def reference(self, view: StepView) -> Tensor:
        if not view.first_call:
            return view.attendable.clone()
        budget, window, _ = self._plan(view)
        pooled = torch.zeros_like(view.scores)
        B, H, L = pooled.shape
        half = self.kernel // 2
        for b in range(B):
            for h in range(H):
                votes = [
                    float(view.key_sums[b, h, j])
                    if view.attendable[b, h, j] and not window[b, h, j]
                    else 0.0
                    for j in range(L)
                ]
                for j in range(L):
                    pooled[b, h, j] = max(votes[max(0, j - half) : j + half + 1])
        return _reference_select(view, budget, window, pooled)


def pyramid_kv(
    average: int | float, num_layers: int, beta: float = 20.0, window: int = 32, kernel: int = 7
) -> SnapKV:
    """PyramidKV ("PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling", Cai et al., 2024): SnapKV's selection with per-layer budgets that shrink
    linearly from the bottom layer to the top; as in the paper, the observation window is kept
    in every layer and the rest of the ``average`` budget (tokens or a fraction of the prompt)
    forms the pyramid (``attnkit.kv.budget.Pyramid``)."""
    return SnapKV(pyramid(average, num_layers, beta, reserved=window), window=window, kernel=kernel)


@dataclass(frozen=True)
class DuoAttention:
    """Retrieval heads keep everything, streaming heads keep sinks + a recent window
    ("DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
    Xiao et al., 2024).

    ``retrieval`` marks retrieval KV heads per layer (bool ``[num_layers, Hkv]``); DuoAttention
    learns it with gates on synthetic passkey data, RazorAttention finds it from echo/induction
    scores on a repeated random sequence (``attnkit.kv.retrieval_heads``). Streaming heads behave
    as ``StreamingLLM(sinks + recent, sinks)``: constant memory. With every head marked
    retrieval this is ``FullCache``; with none, ``StreamingLLM``.

    Args:
        retrieval: bool ``[num_layers, num_kv_heads]``.
        sinks: sink tokens of streaming heads.
        recent: recent tokens of streaming heads.
    """

    retrieval: Tensor
    sinks: int = 4
    recent: int = 256
    name: str = "duo"

    def __post_init__(self) -> None:
        flags = torch.as_tensor(self.retrieval)
        if flags.dtype != torch.bool or flags.dim() != 2:
            raise ValueError(
                f"retrieval must be a bool tensor [num_layers, num_kv_heads] (True = retrieval "
                f"head), got {flags.dtype} {tuple(flags.shape)}"
            )
        object.__setattr__(self, "retrieval", flags.cpu())
        if self.sinks < 0 or self.recent < 1:
            raise ValueError(f"need sinks >= 0 and recent >= 1, got {self.sinks}, {self.recent}")

    def check(self, num_layers: int | None, num_kv_heads: int) -> None:
        layers, heads = self.retrieval.shape
        if heads != num_kv_heads or (num_layers is not None and layers != num_layers):
            raise ValueError(
                f"DuoAttention's retrieval flags are [{layers}, {heads}] but the model has "
                f"{num_layers if num_layers is not None else '?'} layers and {num_kv_heads} KV "
                "heads; flags are per KV head (reduce query-head scores with "
                "retrieval_heads.select(..., groups=Hq // Hkv))"
            )

    def queries(self, layer: int, num_queries: int, first_call: bool) -> slice | None:
        return None

    def _streaming(self) -> StreamingLLM:
        return StreamingLLM(self.sinks + self.recent, self.sinks)

    def _retrieval(self, view: StepView) -> Tensor:
        if view.layer >= self.retrieval.shape[0]:
            raise ValueError(
                f"DuoAttention has retrieval flags for {self.retrieval.shape[0]} layers; "
                f"none for layer {view.layer}"
            )
        self.check(None, view.num_kv_heads)
        return self.retrieval[view.layer].to(view.positions.device).view(1, -1, 1)

    def keep(self, view: StepView) -> Tensor:
        retrieval = self._retrieval(view)
        return torch.where(retrieval, view.attendable, self._streaming().keep(view))

    def reference(self, view: StepView) -> Tensor:
        retrieval = self._retrieval(view)
        return torch.where(retrieval, view.attendable, self._streaming().reference(view))


#: Policy name -> class or factory (for benchmarks and the CLI).
POLICIES = {
    "full": FullCache,
    "streaming_llm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": pyramid_kv,
    "duo": DuoAttention,
}
