"""The LSE merge: partial attention results over disjoint key sets combine exactly.

A partial result over a key set ``S`` is ``(out_S, lse_S)`` with ``out_S`` the *normalised*
output over ``S`` (``[..., Dv]``) and ``lse_S = log sum_{j in S} w_j`` (``[...]``). Then

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

A piece that saw no key has ``lse = -inf`` and contributes nothing; if no piece saw a key the
result is ``out = 0``, ``lse = -inf``. Chunked execution, split-KV decoding, prefix-shared caches
and context parallelism all call this one function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.primitives import finite_or_zero


def merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial results. ``out_*``: ``[..., Dv]``; ``lse_*``: ``[...]`` (float32
    recommended). Returns ``(out, lse)``; ``out`` has the promoted dtype of ``out_a`` and
    ``out_b`` (so a float32 accumulator merged with float64 pieces stays float64)."""
    lse = torch.logaddexp(lse_a, lse_b)
    ref = finite_or_zero(lse)
    w_a = torch.exp(lse_a - ref).unsqueeze(-1)
    w_b = torch.exp(lse_b - ref).unsqueeze(-1)
    out = out_a * w_a.to(out_a.dtype) + out_b * w_b.to(out_b.dtype)
    return out, lse


def merge_all(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge any number of partial results at once (one rescale per piece)."""
    if not outs or len(outs) != len(lses):
        raise ValueError("merge_all needs one lse per output and at least one piece")
    stacked = torch.stack(lses)
    lse = torch.logsumexp(stacked, dim=0)
    ref = finite_or_zero(lse)
    out = sum(
        o * torch.exp(l - ref).unsqueeze(-1).to(o.dtype) for o, l in zip(outs, lses, strict=True)
    )
    return out, lse
