"""What every head layout shares: the forward contract, input checks, positions, KV-cache size.

A head layout is an ``nn.Module`` that turns ``x [B, T, C]`` into per-head outputs
``[B, T, Hq, Dv]``; ``attnkit.nn.Attention`` applies the output gate and ``o_proj``:

    heads = layout(x, attend, rotary=None, positions=None)

- ``attend(q, k, v) -> [B, T, Hq, Dv]`` (an ``attnkit.nn.Attend``) says what each head computes
  (mask, score function, bias, backend). A KV cache wraps it, so layouts call it with this
  call's new ``k``/``v`` only and never slice by absolute position.
- ``rotary(t [B, T, H, Dr], positions) -> [B, T, H, Dr]`` rotates queries and keys after their
  projection (RoPE); ``Dr`` is the layout's ``rotary_dim``.
- ``positions``: int ``[T]`` or ``[B, T]``; default ``arange(T)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnkit.attend import Attend

#: ``rotary(t [B, T, H, Dr], positions [T] or [B, T]) -> [B, T, H, Dr]``.
Rotary = Callable[[Tensor, Tensor], Tensor]


def check_positive(**sizes: int) -> None:
    """Raise ``ValueError`` unless every size is a positive int."""
    for name, value in sizes.items():
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_divides(heads: int, parts: int, heads_name: str, parts_name: str) -> None:
    """Raise ``ValueError`` unless ``parts`` divides ``heads`` (``heads`` shared in groups)."""
    if heads % parts != 0:
        raise ValueError(
            f"{heads_name}={heads} is not a multiple of {parts_name}={parts}: each of the "
            f"{parts_name} must serve the same number of query heads"
        )


class HeadLayout(nn.Module):
    """Base of head layouts. Subclasses set the sizes below and implement ``forward`` and
    ``kv_cache_dims``.

    Attributes:
        d_model: input width ``C``.
        n_heads: query heads ``Hq`` (the output has ``Hq`` heads).
        value_dim: ``Dv``, the width of each output head (``o_proj`` reads ``Hq * Dv``).
        rotary_dim: the last dim of the tensors this layout passes to ``rotary``.
        supports_kv_cache: False for layouts that cannot run through a cache-wrapped
            ``attend`` (they need every head's full score matrix, or regroup heads per call).
    """

    d_model: int
    n_heads: int
    value_dim: int
    rotary_dim: int
    supports_kv_cache: bool = True

    def kv_cache_dims(self) -> dict[str, int]:
        """Numbers cached per token and layer, by part (e.g. ``{"k": Hkv*D, "v": Hkv*D}``)."""
        raise NotImplementedError

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV-cache bytes per token and layer when cached in ``dtype``."""
        return sum(self.kv_cache_dims().values()) * dtype.itemsize

    @property
    def out_features(self) -> int:
        """``Hq * Dv``: the input width of the output projection."""
        return self.n_heads * self.value_dim

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is a floating ``[B, T, d_model]`` tensor."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must be [B, T, C] with C = d_model = {self.d_model}, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got {x.dtype}")

    def check_plain_attend(self, attend: object) -> Attend:
        """Return ``attend`` if it is a plain ``Attend``; layouts that compute scores themselves
        or regroup heads per call cannot honour a cache-wrapped one."""
        if type(attend) is not Attend:
            raise TypeError(
                f"{type(self).__name__} needs a plain attnkit.nn.Attend (it computes every "
                f"head's scores itself or regroups heads per call, so it cannot run through a "
                f"KV cache or another wrapper), got {type(attend).__name__}; decode by "
                f"re-running the prefix without a cache"
            )
        return attend


def default_positions(x: Tensor, positions: Tensor | None, start: int = 0) -> Tensor:
    """``positions``, or ``arange(start, start + T)`` on ``x``'s device when None."""
    if positions is not None:
        return positions
    T = x.shape[1]
    return torch.arange(start, start + T, device=x.device)


def rotate(rotary: Rotary | None, t: Tensor, positions: Tensor) -> Tensor:
    """``rotary(t, positions)``, or ``t`` unchanged when there is no rotary map."""
    return t if rotary is None else rotary(t, positions)


def split_heads(t: Tensor, n_heads: int) -> Tensor:
    """``[B, T, H * D] -> [B, T, H, D]`` (head ``h`` = features ``h*D:(h+1)*D``, as in
    Hugging Face projections)."""
    return t.unflatten(-1, (n_heads, -1))


def softmax_head(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None = None
) -> Tensor:
    """One head of softmax attention, written out for readable references.

    ``q [B, T, D]``, ``k [B, T, D]``, ``v [B, T, Dv]`` -> ``[B, T, Dv]``:
    ``softmax(q k^T * scale + causal mask) v`` with ``scale = 1/sqrt(D)`` by default.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        T = q.shape[1]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
