"""Decoding caches for ``attnkit.nn`` layers: what a layer needs from a cache (``Cache`` for
softmax layers, ``StateCache`` for recurrent ones), the simplest cache (``DenseCache``), and the
wrappers that let a layer's ``Attend`` read and write it, so head layouts never see caching.
(``attnkit.kv.KVCache`` is the cache with eviction policies.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from attnkit.attend import Attend
from attnkit.nn.linear import LinearAttend


class Cache(Protocol):
    """What ``Attention`` needs from a KV cache (``attnkit.nn.DenseCache`` is the simplest)."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's ``k``/``v`` ``[B, T, Hkv, D]``; return all keys/values so far."""
        ...

    def seen(self, layer: int) -> int:
        """Tokens this layer has seen before this step (the next token's position)."""
        ...


class StateCache(Protocol):
    """What a layer with a recurrent mechanism (``attnkit.linear``) needs from a cache."""

    def state(self, layer: int) -> Any:
        """The layer's carried state (None before the first step)."""
        ...

    def set_state(self, layer: int, state: Any, new_tokens: int) -> None:
        """Store the layer's state after ``new_tokens`` more tokens."""
        ...

    def seen(self, layer: int) -> int: ...


@dataclass
class DenseCache:
    """A decoding cache for ``attnkit.nn`` models: every key and value of softmax layers
    (concatenation per layer) and the fixed-size state of recurrent layers."""

    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)
    states: dict[int, Any] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        self.lengths[layer] = k.shape[1]
        return k, v

    def seen(self, layer: int) -> int:
        return self.lengths.get(layer, 0)

    def state(self, layer: int) -> Any:
        return self.states.get(layer)

    def set_state(self, layer: int, state: Any, new_tokens: int) -> None:
        self.states[layer] = state
        self.lengths[layer] = self.seen(layer) + new_tokens


@dataclass(frozen=True)
class CachedAttend:
    attend: Attend
    cache: Cache
    layer: int

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k, v = self.cache.update(self.layer, k, v)
        return self.attend(q, k, v)

    def __getattr__(self, name: str) -> Any:  # layouts read mask/score/bias/scale
        return getattr(self.attend, name)


@dataclass(frozen=True)
class StatefulAttend:
    """A recurrent mechanism's attend, carrying its state in the cache between calls."""

    attend: LinearAttend
    cache: StateCache
    layer: int

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, state = self.attend.step(q, k, v, self.cache.state(self.layer))
        self.cache.set_state(self.layer, state, q.shape[1])
        return out
