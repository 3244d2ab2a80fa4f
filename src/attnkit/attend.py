"""``Attend``: the core attention call a layer's heads make, as one object.

A head layout (``attnkit.heads``) owns its projections and how heads share keys and values; what
each head computes once it has ``q``, ``k`` and ``v`` — mask, score function, bias, backend —
is an ``Attend`` it is handed. A KV cache (``attnkit.nn.cache``, ``attnkit.kv``) wraps an
``Attend`` so that layouts never see caching.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from attnkit.api import attention
from attnkit.masks.base import Mask
from attnkit.positional import Bias
from attnkit.scores import ScoreFunction


@dataclass(frozen=True)
class Attend:
    """``attnkit.attention`` with fixed options: ``attend(q, k, v) -> [B, Tq, Hq, Dv]``.

    ``q [B, Tq, Hq, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]``, as in
    ``attnkit.attention``. Layouts that need the full score matrix (talking heads, DCMHA) read
    ``mask``, ``score``, ``bias`` and ``scale`` from here and compute densely.
    """

    mask: Mask | None = None
    score: ScoreFunction | None = None
    bias: Bias | None = None
    scale: float | None = None
    backend: str = "auto"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(
            q,
            k,
            v,
            mask=self.mask,
            score=self.score,
            bias=self.bias,
            scale=self.scale,
            backend=self.backend,
        )

    def with_options(self, **changes: Any) -> Attend:
        """A copy with some options changed, e.g. ``attend.with_options(backend="reference")``."""
        return replace(self, **changes)
