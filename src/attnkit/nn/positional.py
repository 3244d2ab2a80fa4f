"""Positional schemes of ``attnkit.nn`` layers by name (``AttentionConfig(positional=...)``):
RoPE on q/k, or an additive bias whose learned tensors become parameters of the layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import positional
from attnkit.positional import Bias


@dataclass(frozen=True)
class Positional:
    """A positional scheme for a layer: a rotary map for q/k, an additive bias, or neither."""

    rotary: Callable[[Tensor, Tensor], Tensor] | None = None
    bias: Bias | None = None


def _rope(n_heads: int, head_dim: int, **options: Any) -> Positional:
    return Positional(rotary=positional.Rotary(head_dim, **options))


def _alibi(n_heads: int, head_dim: int) -> Positional:
    return Positional(bias=positional.alibi(n_heads))


def _relative(n_heads: int, head_dim: int, max_distance: int = 128) -> Positional:
    table = nn.Parameter(torch.zeros(n_heads, 2 * max_distance + 1))
    return Positional(bias=positional.relative_bias(n_heads, max_distance, table=table))


def _kerple(n_heads: int, head_dim: int, kernel: str = "log") -> Positional:
    initial = positional.kerple(n_heads, kernel, requires_grad=False)
    r1, r2 = (nn.Parameter(t.clone()) for t in (initial.r1_raw, initial.r2_raw))
    return Positional(bias=positional.Kerple(kernel, r1, r2))


def _t5(n_heads: int, head_dim: int, num_buckets: int = 32, max_distance: int = 128) -> Positional:
    table = nn.Parameter(torch.zeros(num_buckets, n_heads))
    bias = positional.t5_bias(n_heads, num_buckets, max_distance, bidirectional=False, table=table)
    return Positional(bias=bias)


#: Positional scheme name -> ``factory(n_heads, head_dim, **options) -> Positional``
#: (``head_dim`` is the number of dims the layout rotates). Learned tensors are
#: ``nn.Parameter``s, so the layer that holds the bias trains them.
POSITIONAL: dict[str, Callable[..., Positional]] = {
    "none": lambda n_heads, head_dim: Positional(),
    "rope": _rope,
    "alibi": _alibi,
    "relative_bias": _relative,
    "kerple": _kerple,
    "t5": _t5,
}
