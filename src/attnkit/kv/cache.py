"""``KVCache``: a decoding cache whose heads keep different numbers of keys, so eviction frees
memory.

    cache = kv.KVCache(kv.SnapKV(budget=256))
    model = kv.use(model)                       # attnkit.nn models (transformers: kv.hf)
    model.generate(prompt, max_new_tokens=32, cache=cache)
    cache.nbytes(), cache.stored(layer)          # bytes kept, keys per (batch row, KV head)

Storage. Per layer, the kept keys of every (batch row, KV head) pair — a *row* — are packed one
row after the other into one tensor ``[N, D]`` (``N`` = the sum of the rows' lengths), with
their original positions and accumulated attention scores beside them. Keys are stored already
rotated (RoPE), so evicting others never changes a key's position. ``nbytes()`` is exactly
``N * (D + Dv) * itemsize`` summed over layers, and so is the memory the tensors hold.

A call, in two halves (what a ``Cache.update`` + attention pair becomes):

1. ``update(layer, k, v)`` appends this call's keys at the end of every row (one copy of the
   packed storage) and returns the keys in the cache's layout: ``[B, L, Hkv, D]`` when every
   row holds ``L`` keys, else the packed rows as ``[1, N, 1, D]``.
2. ``attend(q, k, v, ...)`` — called by the attention function that received those tensors
   (``attnkit.kv.KVAttend`` for ``attnkit.nn``, the ``attnkit-kv`` implementation for
   transformers) — runs ``attnkit.attention`` (one call when the rows are equal, else one call
   per row on views of the packed storage, each row seeing its own keys, the new ones causally),
   asks for the per-key attention sums the policy needs (``Aux(key_sums=...)``), lets the policy
   choose the keys to keep and packs them (no copy if nothing is evicted).

Why a loop over rows rather than padding to the longest row and masking: with uneven rows,
building the padded tensors (a copy of every row) and one masked call costs more than the
per-row calls on views, while equal rows need no padding and run as one call, which beats the
loop (timings of one decode step: docs/kernels.md).
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import masks
from attnkit.api import attention
from attnkit.attend import Attend
from attnkit.call import Aux
from attnkit.kv.policies import FullCache, Policy, StepView
from attnkit.scores import ScoreFunction


@dataclass
class _Layer:
    """One layer's kept entries, rows packed in (batch row, KV head) order."""

    keys: Tensor  # [N, D]
    values: Tensor  # [N, Dv]
    positions: Tensor  # [N] int64
    scores: Tensor  # [N] float32
    lengths: Tensor  # [B, Hkv] int64
    seen: int = 0
    context: int = 0


@dataclass
class _Step:
    """A call between ``update`` and ``attend``: the new keys appended to every row."""

    cache: KVCache
    layer: int
    keys: Tensor  # [N, D], rows packed, each ending with the call's new keys
    values: Tensor  # [N, Dv]
    positions: Tensor  # [N] int64
    scores: Tensor  # [N] float32
    lengths: Tensor  # [R] int64, R = B * Hkv
    batch: int
    kv_heads: int
    new_tokens: int
    first_call: bool

    @property
    def storage(self) -> int:
        return self.keys.untyped_storage().data_ptr()

    @functools.cached_property
    def uniform(self) -> bool:
        """Every row holds the same number of keys (no padding needed)."""
        return bool((self.lengths == self.lengths[0]).all())

    def bounds(self) -> list[tuple[int, int]]:
        ends = self.lengths.cumsum(0).tolist()
        return [(end - n, end) for end, n in zip(ends, self.lengths.tolist(), strict=True)]

    def batch_index(self) -> Tensor:
        """Batch row of every packed entry, ``[N]``."""
        rows = torch.arange(self.lengths.numel(), device=self.lengths.device)
        return torch.repeat_interleave(rows // self.kv_heads, self.lengths)

    def padded(self, packed: Tensor, fill: float) -> Tensor:
        """A per-entry tensor ``[N]`` as right-aligned rows ``[B, Hkv, L]``."""
        L = int(self.lengths.max())
        if self.uniform:
            return packed.view(self.batch, self.kv_heads, L)
        occupied = _occupied(self.lengths, L)
        out = packed.new_full((self.lengths.numel(), L), fill)
        out[occupied] = packed
        return out.view(self.batch, self.kv_heads, L)


_ACTIVE: contextvars.ContextVar[_Step | None] = contextvars.ContextVar(
    "attnkit_kv_step", default=None
)


def pending_step(k: Tensor) -> _Step | None:
    """The ``KVCache`` call whose keys ``k`` is (any view of them), or None: how an attention
    function knows it must hand the call back to the cache."""
    step = _ACTIVE.get()
    if step is None or k.untyped_storage().data_ptr() != step.storage:
        return None
    return step


def _occupied(lengths: Tensor, L: int) -> Tensor:
    """``[R, L]`` bool: the slots of right-aligned rows of these lengths."""
    return torch.arange(L, device=lengths.device) >= (L - lengths).unsqueeze(1)


def _append(packed: Tensor, lengths: Tensor, new: Tensor) -> Tensor:
    """Rows of ``packed`` (``[N, ...]``, lengths ``[R]``) each followed by its ``new`` entries
    (``[R, T, ...]``), packed: ``[N + R * T, ...]``."""
    R, T = new.shape[:2]
    if R and bool((lengths == lengths[0]).all()):
        old = packed.view(R, int(lengths[0]), *packed.shape[1:])
        return torch.cat([old, new], dim=1).flatten(0, 1)
    device = lengths.device
    out = packed.new_empty((packed.shape[0] + R * T, *packed.shape[1:]))
    # row r's old entries move on by the r * T new entries of the rows before it
    shift = T * torch.repeat_interleave(torch.arange(R, device=device), lengths)
    out.index_copy_(0, torch.arange(packed.shape[0], device=device) + shift, packed)
    ends = (lengths + T).cumsum(0)
    slots = (ends - T).unsqueeze(1) + torch.arange(T, device=device)
    out.index_copy_(0, slots.flatten(), new.flatten(0, 1))
    return out


def _rows(t: Tensor) -> Tensor:
    """``[B, T, H, D] -> [B * H, T, D]`` (rows in (batch, head) order)."""
    B, T, H, D = t.shape
    return t.transpose(1, 2).reshape(B * H, T, D)


class KVCache:
    """A KV cache for decoding with GQA whose eviction ``policy`` keeps a different number of
    keys per layer, batch row and KV head, storing only the kept ones.

    It is an ``attnkit.nn.Cache`` (``update``, ``seen``); ``attnkit.kv.hf.KVCacheHF`` adapts it
    to transformers' ``Cache`` for ``generate``. Positions come from tokens seen, never from
    tokens stored: ``seen(layer)`` is the next token's position.

    Args:
        policy: an ``attnkit.kv.policies`` policy (``FullCache()`` by default).
        num_layers, num_kv_heads: if given, the policy is checked against them now (else at
            the first call, with the KV heads of that call).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
    ):
        self.policy = FullCache() if policy is None else policy
        self.num_layers = num_layers
        if num_kv_heads is not None:
            self.policy.check(num_layers, num_kv_heads)
        self._layers: dict[int, _Layer] = {}
        self._pending: _Step | None = None

    # -- the attnkit.nn.Cache protocol -----------------------------------------------------
    def seen(self, layer: int) -> int:
        """Tokens ``layer`` has seen (the position of the next token)."""
        state = self._layers.get(layer)
        return 0 if state is None else state.seen

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k [B, T, Hkv, D]``, ``v [B, T, Hkv, Dv]`` to every row of ``layer``; return
        all keys/values as ``[B, L, Hkv, D]`` if every row holds ``L`` keys, else as the packed
        rows ``[1, N, 1, D]``. The caller's attention function must then call ``attend`` with
        these tensors (``KVAttend`` / ``attnkit.kv.hf`` do)."""
        if self._pending is not None:
            stale = self._pending.layer
            self._pending = None
            _ACTIVE.set(None)
            raise RuntimeError(
                f"attnkit.kv.KVCache: the keys layer {stale} received were never attended through "
                "the cache (or that call failed), so nothing was evicted or stored. Run the model "
                "with a cache-aware attention: attnkit.kv.use(model) for attnkit.nn models, "
                "attnkit.kv.hf.prepare(model) for transformers models."
            )
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"k and v must be [B, T, Hkv, D] with equal B, T, Hkv; got {tuple(k.shape)}, "
                f"{tuple(v.shape)}"
            )
        B, T, Hkv, _ = k.shape
        state = self._layers.get(layer)
        if state is None:
            if self.num_layers is not None and not 0 <= layer < self.num_layers:
                raise ValueError(f"layer {layer} is outside this cache's {self.num_layers} layers")
            self.policy.check(self.num_layers, Hkv)
            state = _Layer(
                keys=k.new_empty(0, k.shape[3]),
                values=v.new_empty(0, v.shape[3]),
                positions=torch.empty(0, dtype=torch.long, device=k.device),
                scores=torch.empty(0, device=k.device),
                lengths=torch.zeros(B, Hkv, dtype=torch.long, device=k.device),
            )
            self._layers[layer] = state
        elif tuple(state.lengths.shape) != (B, Hkv) or state.keys.dtype != k.dtype:
            raise ValueError(
                f"layer {layer} holds a batch of {state.lengths.shape[0]} with "
                f"{state.lengths.shape[1]} KV heads ({state.keys.dtype}); this call has B={B}, "
                f"Hkv={Hkv} ({k.dtype}). Use a new cache for a new batch (or call reset())"
            )
        R = B * Hkv
        lengths = state.lengths.view(R)
        new_positions = torch.arange(state.seen, state.seen + T, device=k.device).expand(R, T)
        step = _Step(
            cache=self,
            layer=layer,
            keys=_append(state.keys, lengths, _rows(k)),
            values=_append(state.values, lengths, _rows(v)),
            positions=_append(state.positions, lengths, new_positions),
            scores=_append(state.scores, lengths, state.scores.new_zeros(R, T)),
            lengths=lengths + T,
            batch=B,
            kv_heads=Hkv,
            new_tokens=T,
            first_call=state.seen == 0,
        )
        state.seen += T
        if step.first_call:
            state.context = state.seen
        self._pending = step
        _ACTIVE.set(step)
        if step.uniform:
            L = int(step.lengths[0])
            return (
                step.keys.view(B, Hkv, L, -1).transpose(1, 2),
                step.values.view(B, Hkv, L, -1).transpose(1, 2),
            )
        return step.keys.view(1, -1, 1, k.shape[3]), step.values.view(1, -1, 1, v.shape[3])

    # -- the second half of a call ---------------------------------------------------------
    def attend(
        self,
        q: Tensor,
        k: Tensor,
        *,
        causal: bool = True,
        key_mask: Tensor | None = None,
        query_key_mask: Tensor | None = None,
        score: ScoreFunction | None = None,
        scale: float | None = None,
        backend: str = "auto",
    ) -> Tensor:
        """Attention of ``q [B, Tq, Hq, D]`` over the keys ``update`` just returned (``k``: that
        tensor or a view of it), then eviction. Returns ``[B, Tq, Hq, Dv]``.

        Each query sees its KV head's kept keys, the call's new keys causally if ``causal``
        (bottom-right aligned: the new keys end every row), and only keys allowed by
        ``key_mask`` (bool ``[N]`` per packed entry, e.g. a padding mask evaluated at each
        entry's position: such keys are never stored) and by ``query_key_mask`` (bool
        ``[Tq, N]``, a model's own mask evaluated at the entries' positions; replaces
        ``causal``). Per-entry positions and batch rows: ``pending_step(k).positions`` and
        ``.batch_index()``.
        """
        step = self._pending
        if step is None or pending_step(k) is not step:
            raise RuntimeError(
                "KVCache.attend must follow KVCache.update and receive the keys it returned"
            )
        self._pending = None
        _ACTIVE.set(None)
        B, Tq, Hq, _ = q.shape
        Hkv = step.kv_heads
        if step.batch != B or Hq % Hkv:
            raise ValueError(
                f"q is {tuple(q.shape)} but the cache call has B={step.batch}, Hkv={Hkv}: the "
                "batch must match and Hq must be a multiple of Hkv"
            )
        if causal and query_key_mask is None and Tq != step.new_tokens:
            raise ValueError(
                f"causal attention needs one query per new key: Tq={Tq}, new keys={step.new_tokens}"
            )
        causal = causal and Tq > 1  # one query sees every key (bottom-right alignment)
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None
        selector = self.policy.queries(step.layer, Tq, step.first_call)
        options: dict[str, Any] = dict(score=score, scale=scale, backend=backend)
        if selector is not None:
            options["aux"] = Aux(key_sums=selector)
        if step.uniform and key_mask is None and query_key_mask is None:
            out, key_sums = self._attend_uniform(step, q, causal, options)
        else:
            out, key_sums = self._attend_rows(step, q, causal, key_mask, query_key_mask, options)
        attendable = torch.ones_like(step.positions, dtype=torch.bool)
        if key_mask is not None:
            attendable = attendable & key_mask
        scores = step.scores if key_sums is None else step.scores + key_sums
        state = self._layers[step.layer]
        view = StepView(
            layer=step.layer,
            positions=step.padded(step.positions, -1),
            attendable=step.padded(attendable, False),
            scores=step.padded(scores, 0.0),
            key_sums=None if key_sums is None else step.padded(key_sums, 0.0),
            new_tokens=step.new_tokens,
            seen=state.seen,
            context=state.context,
            first_call=step.first_call,
        )
        keep = (self.policy.keep(view) & view.attendable).flatten(0, 1)
        keep = keep.flatten() if step.uniform else keep[_occupied(step.lengths, keep.shape[1])]
        self._store(state, step, keep, scores)
        return out

    def _attend_uniform(
        self, step: _Step, q: Tensor, causal: bool, options: dict[str, Any]
    ) -> tuple[Tensor, Tensor | None]:
        B, L, Hkv = step.batch, int(step.lengths[0]), step.kv_heads
        k = step.keys.view(B, Hkv, L, -1).transpose(1, 2)
        v = step.values.view(B, Hkv, L, -1).transpose(1, 2)
        mask = masks.causal() if causal else None
        if "aux" not in options:
            return attention(q, k, v, mask=mask, **options), None
        out, aux = attention(q, k, v, mask=mask, **options)
        return out, aux.key_sums.view(B, Hkv, -1, L).sum(2).flatten()

    def _attend_rows(
        self,
        step: _Step,
        q: Tensor,
        causal: bool,
        key_mask: Tensor | None,
        query_key_mask: Tensor | None,
        options: dict[str, Any],
    ) -> tuple[Tensor, Tensor | None]:
        B, Tq, Hq, _ = q.shape
        G = Hq // step.kv_heads
        out = q.new_empty(B, Tq, Hq, step.values.shape[1])
        key_sums = None if "aux" not in options else torch.zeros_like(step.scores)
        for row, (start, end) in enumerate(step.bounds()):
            b, h = divmod(row, step.kv_heads)
            k = step.keys[start:end].view(1, end - start, 1, -1)
            v = step.values[start:end].view(1, end - start, 1, -1)
            if query_key_mask is not None:
                allowed = query_key_mask[:, start:end]
                if key_mask is not None:
                    allowed = allowed & key_mask[start:end]
                mask = masks.from_dense(allowed.view(1, 1, Tq, end - start))
            else:
                mask = masks.causal() if causal else None
                if key_mask is not None and not bool(key_mask[start:end].all()):
                    keys = masks.keys(key_mask[start:end].view(1, -1))
                    mask = keys if mask is None else mask & keys
            heads = slice(h * G, (h + 1) * G)
            if key_sums is None:
                part = attention(q[b : b + 1, :, heads], k, v, mask=mask, **options)
            else:
                part, aux = attention(q[b : b + 1, :, heads], k, v, mask=mask, **options)
                key_sums[start:end] = aux.key_sums[0].sum(0)
            out[b, :, heads] = part[0]
        return out, key_sums

    def _store(self, state: _Layer, step: _Step, keep: Tensor, scores: Tensor) -> None:
        if bool(keep.all()):  # nothing evicted, no padding: the appended rows are the storage
            state.keys, state.values = step.keys, step.values
            state.positions, state.scores = step.positions, scores
            state.lengths = step.lengths.view_as(state.lengths)
            return
        state.keys, state.values = step.keys[keep], step.values[keep]
        state.positions, state.scores = step.positions[keep], scores[keep]
        rows = torch.repeat_interleave(
            torch.arange(step.lengths.numel(), device=keep.device), step.lengths
        )
        lengths = torch.zeros_like(step.lengths).index_add_(0, rows, keep.long())
        state.lengths = lengths.view_as(state.lengths)

    # -- inspection ------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Layer indices this cache holds."""
        return sorted(self._layers)

    def stored(self, layer: int) -> Tensor:
        """Keys kept per (batch row, KV head) of ``layer``, ``[B, Hkv]`` int64."""
        return self._layers[layer].lengths.clone()

    def positions(self, layer: int) -> Tensor:
        """Original positions of the kept keys, ``[B, Hkv, Lmax]`` int64, right-aligned and
        padded with -1 on the left."""
        state = self._layers[layer]
        B, Hkv = state.lengths.shape
        lengths = state.lengths.view(-1)
        longest = int(lengths.max()) if lengths.numel() else 0
        out = state.positions.new_full((B * Hkv, longest), -1)
        out[_occupied(lengths, longest)] = state.positions
        return out.view(B, Hkv, longest)

    def head(self, layer: int, batch: int, kv_head: int) -> tuple[Tensor, Tensor, Tensor]:
        """The kept ``keys [n, D]``, ``values [n, Dv]`` and ``positions [n]`` of one row: views
        into the packed storage, no copy."""
        state = self._layers[layer]
        Hkv = state.lengths.shape[1]
        lengths = state.lengths.view(-1)
        row = batch * Hkv + kv_head
        start = int(lengths[:row].sum())
        end = start + int(lengths[row])
        return state.keys[start:end], state.values[start:end], state.positions[start:end]

    def nbytes(self) -> int:
        """Bytes of keys and values kept, over all layers: ``sum of kept entries x (D + Dv) x
        itemsize`` (positions and scores, 12 bytes per entry, are bookkeeping, not counted)."""
        return sum(
            s.keys.numel() * s.keys.element_size() + s.values.numel() * s.values.element_size()
            for s in self._layers.values()
        )

    def full_nbytes(self) -> int:
        """Bytes a cache keeping every token seen would hold (same layers, batch and heads)."""
        total = 0
        for s in self._layers.values():
            B, Hkv = s.lengths.shape
            per_token = s.keys.shape[1] * s.keys.element_size()
            per_token += s.values.shape[1] * s.values.element_size()
            total += s.seen * B * Hkv * per_token
        return total

    def reset(self) -> None:
        """Forget every layer (a new sequence or batch)."""
        self._layers.clear()
        self._pending = None
        _ACTIVE.set(None)

    def __repr__(self) -> str:
        kept = sum(int(s.lengths.sum()) for s in self._layers.values())
        return f"KVCache({self.policy!r}, layers={len(self._layers)}, kept entries={kept})"


# -- attnkit.nn models -----------------------------------------------------------------------


@dataclass(frozen=True)
class KVAttend(Attend):
    """An ``attnkit.nn.Attend`` that hands calls on ``KVCache`` keys back to the cache (masks,
    statistics, eviction); every other call is plain ``Attend``. ``use(model)`` installs it.

    With a cache, the layer's mask must be causal or None: keys are stored at their original
    positions but padded per head, so other positional masks and biases cannot be evaluated on
    the slots (use a policy instead, e.g. ``StreamingLLM`` for sinks + window).
    """

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        step = pending_step(k)
        if step is None:
            return super().__call__(q, k, v)
        if self.bias is not None or not (self.mask is None or self.mask.is_plain_causal):
            step.cache.reset()
            raise ValueError(
                f"attnkit.kv caches support causal (or unmasked) attention without a bias; this "
                f"layer has mask={self.mask!r}, bias={self.bias!r}. Express windows and sinks "
                "as a policy (attnkit.kv.StreamingLLM)"
            )
        return step.cache.attend(
            q,
            k,
            causal=self.mask is not None,
            score=self.score,
            scale=self.scale,
            backend=self.backend,
        )


def use(model: nn.Module) -> nn.Module:
    """Make every softmax ``Attend`` of ``model``'s layers cache-aware (``KVAttend``: the
    ``attend`` of each ``attnkit.nn.Attention``), so it decodes with a ``KVCache``:
    ``model.generate(ids, n, cache=KVCache(policy))``. Calls without a ``KVCache`` are
    unchanged. Returns ``model`` (changed in place)."""
    found = 0
    for module in model.modules():
        attend = getattr(module, "attend", None)
        if isinstance(attend, Attend):
            if not isinstance(attend, KVAttend):
                module.attend = KVAttend(
                    **{f.name: getattr(attend, f.name) for f in fields(attend)}
                )
            found += 1
    if not found:
        raise TypeError(
            f"{type(model).__name__} has no attnkit.nn.Attention layers with softmax "
            "attention; for a transformers model use attnkit.kv.hf.prepare(model)"
        )
    return model
