"""Dense attention with hooks between heads: for layouts that mix heads' scores or weights.

Talking-heads attention and DCMHA combine every head's score matrix, which no fused kernel
exposes, so they compute attention densely (O(T^2) memory) with the ``Attend``'s options:

    s   = scale * q k^T                         [B, Hq, Tq, Tk]  (k/v heads repeated for GQA)
    s   = compose_scores(s)                     cross-head mixing of the logits
    lw  = log w(softcap(s + bias)), -inf where the mask forbids (per output head)
    p   = exp(lw - lse) (normalised scores), exp(lw) (unnormalised), times sign(s) (signed)
    p   = compose_weights(p) * allowed          cross-head mixing of the weights, re-masked
    out = p v                                   [B, Tq, Hq, Dv]

With identity compositions this is exactly ``attnkit.attention`` with the same options. The
re-mask keeps each head's own pattern when the mask differs between heads; for a mask shared
by all heads it changes nothing (masked weights are zero in every head before mixing).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from attnkit.attend import Attend
from attnkit.call import AttentionCall
from attnkit.primitives import expand_kv_heads
from attnkit.scores import Softmax

#: Maps ``[B, Hq, Tq, Tk]`` to ``[B, Hq, Tq, Tk]``, mixing heads.
Compose = Callable[[Tensor], Tensor]

#: Backends a dense layout honours: it computes on its own, like the reference backend.
DENSE_BACKENDS = ("auto", "reference")


def dense_attend(
    attend: Attend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    compose_scores: Compose | None = None,
    compose_weights: Compose | None = None,
) -> Tensor:
    """Attention of ``q [B, Tq, Hq, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]`` with
    the options of ``attend`` and cross-head compositions (talking heads, Shazeer et al., 2020;
    DCMHA, Xiao et al., 2024) before and after the weighting
    (module docstring). Returns ``[B, Tq, Hq, Dv]``. Computes in float32 for half-precision
    inputs, like the reference backend."""
    if attend.backend not in DENSE_BACKENDS:
        raise ValueError(
            f"this layout mixes every head's scores and computes attention densely; it cannot "
            f"run on backend {attend.backend!r} (use one of {DENSE_BACKENDS})"
        )
    call = AttentionCall(q, k, v, attend.mask, attend.score or Softmax(), attend.bias, attend.scale)
    acc = call.accumulation_dtype
    p, _ = call.dense_weights(acc, compose_scores)
    vh = expand_kv_heads(v.to(acc).transpose(1, 2), call.groups, dim=1)
    if compose_weights is not None:
        p = compose_weights(p)
        if call.mask is not None:
            p = p * call.mask.dense(call.Tq, call.Tk, q.device)
    return (p @ vh).transpose(1, 2).to(q.dtype)
