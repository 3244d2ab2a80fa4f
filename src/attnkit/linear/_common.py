"""Checks and small helpers shared by every mechanism of ``attnkit.linear``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import Tensor

#: The three forms every causal mechanism has (non-causal ones lack ``recurrent``).
FORMS = ("reference", "chunked", "recurrent")

F = TypeVar("F", bound=Callable)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, same_length: bool = True) -> int:
    """Validate ``q [B, Tq, Hq, D]``, ``k [B, T, Hkv, D]``, ``v [B, T, Hkv, Dv]``; return the
    GQA group size ``Hq // Hkv``. ``same_length``: ``Tq`` must equal ``T`` (self-attention)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on batch, length and heads"
        )
    if q.shape[0] != k.shape[0] and q.shape[0] != 1:
        raise ValueError(f"q has batch {q.shape[0]}, k has {k.shape[0]}: they must match")
    if same_length and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q has {q.shape[1]} tokens, k has {k.shape[1]}: this mechanism is self-attention "
            "over one sequence; pass the same length"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q has head dim {q.shape[-1]}, k has {k.shape[-1]}: they must match")
    Hq, Hkv = q.shape[2], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"k has {Hkv} heads, q has {Hq}: Hq must be a multiple of Hkv")
    return Hq // Hkv


def within(x: Tensor, low: float, high: float) -> bool:
    """True when every value of ``x`` lies in ``[low, high]`` (False for NaN), in one pass and
    without a boolean tensor the size of ``x`` (gates at long T are hundreds of MB)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(lo >= low) and bool(hi <= high)


def check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size


def pick(table: Mapping[str, F], choice: str, what: str) -> F:
    """``table[choice]``, or a ValueError listing the choices."""
    if choice not in table:
        raise ValueError(f"unknown {what} {choice!r}; choose one of: {', '.join(table)}")
    return table[choice]


def per_head(value: Tensor | float | None, heads: int, default: Tensor, what: str) -> Tensor:
    """A per-head constant ``[heads]`` (float64) from a scalar, a tensor or the default."""
    if value is None:
        return default.double()
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() == 0:
        t = t.expand(heads)
    if t.shape != (heads,):
        raise ValueError(f"{what} must be a scalar or one value per key/value head ({heads})")
    return t


def no_state(initial_state: object, return_state: bool, why: str) -> None:
    """Refuse state arguments for a mechanism that has no recurrent state."""
    if initial_state is not None or return_state:
        raise ValueError(f"{why}: it has no recurrent state (drop initial_state/return_state)")
