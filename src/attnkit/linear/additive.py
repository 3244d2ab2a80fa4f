"""Efficient additive attention — "SwiftFormer: Efficient Additive Attention for
Transformer-based Real-time Mobile Vision Applications", Shaker, Maaz, Rasheed, Khan, Yang,
Khan (2023).

No ``Q K^T`` matrix and no values: per head, a learned vector ``w`` scores every (l2-normalised)
query, the scores pool the queries into one global query, and it interacts with every key
elementwise:

    alpha_t = (q^_t . w) / sqrt(D),  normalised over the tokens,   g = sum_t alpha_t q^_t
    out_t = g * k^_t                                       (q^, k^: l2-normalised over D)

The layer then applies a linear map to ``out`` and adds ``q^`` (the authors' ``Proj(G * key) +
query``), which belong to the module, not to this function. The paper's equations leave the
normalisation of ``alpha`` open; the authors' code l2-normalises it over the tokens
(``pooling="l2"``); ``pooling="softmax"`` is the softmax the name "attention" suggests.

As an attention matrix every row is the same, ``A[i, t] = alpha_t``: the reference form writes
``(A Q^) * K^`` densely. The paper is a vision encoder with no causal variant: non-causal only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.linear._common import check_qkv, pick
from attnkit.primitives import accumulation_dtype

PAPER = (
    "SwiftFormer: Efficient Additive Attention for Transformer-based Real-time Mobile Vision "
    "Applications — Shaker, Maaz, Rasheed, Khan, Yang, Khan (2023)"
)

#: How the token scores are normalised over the sequence (axis 1).
POOLING: dict[str, Callable[[Tensor], Tensor]] = {
    "l2": lambda a: F.normalize(a, dim=1),
    "softmax": lambda a: torch.softmax(a, dim=1),
}


def _parts(q: Tensor, k: Tensor, w: Tensor, pooling: str) -> tuple[Tensor, Tensor, Tensor]:
    acc = accumulation_dtype(q.dtype)
    qn, kn = F.normalize(q.to(acc), dim=-1), F.normalize(k.to(acc), dim=-1)
    scores = torch.einsum("bthd,hd->bth", qn, w.to(acc)) / math.sqrt(q.shape[-1])
    return qn, kn, pick(POOLING, pooling, "pooling")(scores)


def _grouped(g: Tensor, kn: Tensor) -> Tensor:
    """``g [B, T or 1, Hq, D] * k^ [B, T, Hkv, D]`` with query head ``h`` on key head ``h // G``."""
    B, T, Hkv, D = kn.shape
    G = g.shape[2] // Hkv
    return (g.reshape(B, g.shape[1], Hkv, G, D) * kn.unsqueeze(3)).reshape(B, T, Hkv * G, D)


def _reference(q: Tensor, k: Tensor, w: Tensor, pooling: str) -> Tensor:
    qn, kn, alpha = _parts(q, k, w, pooling)
    T = q.shape[1]
    A = alpha.transpose(1, 2).unsqueeze(2).expand(-1, -1, T, -1)  # [B, Hq, T(i), T(t)]
    pooled = torch.einsum("bhit,bthd->bihd", A, qn)
    return _grouped(pooled, kn).to(q.dtype)


def _fast(q: Tensor, k: Tensor, w: Tensor, pooling: str) -> Tensor:
    qn, kn, alpha = _parts(q, k, w, pooling)
    g = torch.einsum("bth,bthd->bhd", alpha, qn)
    return _grouped(g.unsqueeze(1), kn).to(q.dtype)


_FORMS = {"reference": _reference, "chunked": _fast}


def efficient_additive_attention(
    q: Tensor, k: Tensor, w: Tensor, *, pooling: str = "l2", form: str = "chunked"
) -> Tensor:
    """SwiftFormer's efficient additive attention (Shaker et al., 2023), non-causal.

    Args:
        q: ``[B, T, Hq, D]``, k: ``[B, T, Hkv, D]`` (GQA allowed; no values).
        w: the learned scoring vector per query head, ``[Hq, D]``.
        pooling: ``"l2"`` (the authors' code) or ``"softmax"`` normalisation of the scores.
        form: ``"chunked"`` (the pooled global query, ``O(T D)``) or ``"reference"`` (the
            dense rank-one attention matrix).

    Returns:
        ``g * k^`` as ``[B, T, Hq, D]`` (before the layer's projection and residual).
    """
    check_qkv(q, k, k)
    if tuple(w.shape) != (q.shape[2], q.shape[3]):
        raise ValueError(f"w must be [Hq, D] = {[q.shape[2], q.shape[3]]}, got {tuple(w.shape)}")
    return pick(_FORMS, form, "form of additive attention (non-causal: no recurrent form)")(
        q, k, w, pooling
    )
