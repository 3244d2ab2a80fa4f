"""Relative attention with the skewing trick (Music Transformer).

"Music Transformer: Generating Music with Long-Term Structure" (Huang, Vaswani, Uszkoreit,
Shazeer, Simon, Hawthorne, Dai, Hoffman, Dinculescu, Eck, 2018), building on "Self-Attention
with Relative Position Representations" (Shaw, Uszkoreit, Vaswani, 2018). Causal attention
whose logits add, for query ``i`` and key ``j <= i``, the query's product with a learned
embedding of their distance:

    logits[i, j] = (q_i·k_j + q_i·e_(i-j)) * scale,    out = causal_softmax(logits) v

``rel_emb[d]`` is ``e_d``, the embedding of distance ``d = i - j >= 0`` (the paper's ``E_r``
lists relative positions ``-(L-1)..0``, i.e. ``rel_emb.flip(0)``); distances ``>= L`` share
``e_(L-1)`` (Shaw et al.'s clipping).

Memory. Shaw et al. gather one embedding per (query, key) pair: ``[Tq, Tk, D]`` per head,
O(T²D). The skew computes ``Q E^T`` against the ``Tk`` distance embeddings once (``[Tq, Tk]``
logits, the size of ``QK^T`` itself) and moves each row into place with one pad and one
reshape, so the relative embeddings cost O(T·D) — the paper's saving from quadratic to
linear in intermediate memory. ``relative_logits_gather`` is the O(T²D) form, kept as the
readable reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.masks.base import aligned_query_positions
from attnkit.primitives import expand_kv_heads


def _check(q: Tensor, rel_emb: Tensor, Tk: int) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Tq, H, D], got shape {tuple(q.shape)}")
    Tq, H, D = q.shape[1:]
    if Tq > Tk:
        raise ValueError(
            f"relative attention is causal with bottom-right alignment: Tq ({Tq}) must be "
            f"<= Tk ({Tk})"
        )
    if rel_emb.dim() not in (2, 3) or rel_emb.shape[-1] != D or rel_emb.shape[-2] == 0:
        raise ValueError(
            f"rel_emb must be [L, D] (shared) or [H, L, D] (per head) with D = {D}, "
            f"got {tuple(rel_emb.shape)}"
        )
    if rel_emb.dim() == 3 and rel_emb.shape[0] != H:
        raise ValueError(f"rel_emb has {rel_emb.shape[0]} heads but q has {H}; use [L, D] to share")


def _future(Tq: int, Tk: int, device: torch.device) -> Tensor:
    """``[Tq, Tk]`` True where key ``j`` lies after query ``i`` (bottom-right aligned)."""
    pos = aligned_query_positions(torch.arange(Tq, device=device).view(-1, 1), Tq, Tk)
    return torch.arange(Tk, device=device).view(1, -1) > pos


def _per_head(rel_emb: Tensor) -> Tensor:
    return rel_emb if rel_emb.dim() == 3 else rel_emb.unsqueeze(0)


def relative_logits(q: Tensor, rel_emb: Tensor, Tk: int) -> Tensor:
    """``S_rel[b, h, i, j] = q_i · e_(pos_i - j)`` for keys ``j <= pos_i``, 0 for later keys,
    by the skew: ``[B, Hq, Tq, Tk]`` in ``q``'s dtype.

    Huang et al. (2018), "Music Transformer". ``q [B, Tq, Hq, D]``, ``rel_emb`` ``[L, D]`` or
    ``[Hq, L, D]``; query ``i`` sits at key position ``pos_i = i + Tk - Tq``. With
    ``E[c] = e_(Tk-1-c)`` (clipped at ``L - 1``), ``M = Q E^T`` holds in row ``i``, column
    ``c`` the product with relative position ``c - (Tk-1)``; padding one zero column on the
    left, dropping the first ``Tq`` entries of the flattened ``[Tq, Tk+1]`` and reading the rest
    as ``[Tq, Tk]`` shifts row ``i`` left by ``Tq - 1 - i``, which puts distance ``pos_i - j``
    under column ``j`` (for square inputs: the paper's "pad, reshape to (L+1)×L, drop the first
    row"). Extra memory for the relative embeddings: ``[H, Tk, D]``.
    """
    _check(q, rel_emb, Tk)
    B, Tq, H = q.shape[:3]
    distance = (Tk - 1 - torch.arange(Tk, device=q.device)).clamp_max(rel_emb.shape[-2] - 1)
    E = _per_head(rel_emb)[:, distance]  # [H|1, Tk, D]
    M = torch.einsum("bihd,hcd->bhic", q, E.expand(H, -1, -1))  # [B, H, Tq, Tk]
    skewed = F.pad(M, (1, 0)).flatten(-2)[..., Tq:].view(B, H, Tq, Tk)
    return skewed.masked_fill(_future(Tq, Tk, q.device), 0.0)


def relative_logits_gather(q: Tensor, rel_emb: Tensor, Tk: int) -> Tensor:
    """The same ``[B, Hq, Tq, Tk]`` as ``relative_logits``, the way Shaw et al. (2018) write
    it: gather one embedding per (query, key) pair into ``[Hq|1, Tq, Tk, D]`` (O(T²D) memory)
    and take each query's dot product with its row. The readable reference."""
    _check(q, rel_emb, Tk)
    Tq = q.shape[1]
    pos = aligned_query_positions(torch.arange(Tq, device=q.device).view(-1, 1), Tq, Tk)
    distance = (pos - torch.arange(Tk, device=q.device).view(1, -1)).clamp(0, rel_emb.shape[-2] - 1)
    pairs = _per_head(rel_emb)[:, distance]  # [H|1, Tq, Tk, D]: e_(i-j) for every pair
    logits = torch.einsum("bihd,hijd->bhij", q, pairs.expand(q.shape[2], -1, -1, -1))
    return logits.masked_fill(_future(Tq, Tk, q.device), 0.0)


def relative_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor, *, scale: float | None = None
) -> Tensor:
    """Music Transformer relative self-attention: ``[B, Tq, Hq, Dv]``.

    Huang et al. (2018), "Music Transformer: Generating Music with Long-Term Structure".
    ``q [B, Tq, Hq, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]`` (GQA: ``Hq % Hkv ==
    0``), ``rel_emb`` ``[L, D]`` shared or ``[Hq, L, D]`` per head; causal, bottom-right
    aligned (``Tq <= Tk``, decoding included). ``logits = (QK^T + S_rel) * scale`` with
    ``S_rel`` from the skew (``relative_logits``); the softmax runs in PyTorch's fused
    ``scaled_dot_product_attention`` with ``S_rel * scale`` as its float mask (autograd
    reaches ``rel_emb`` through it). ``scale`` defaults to ``1/sqrt(D)``.

    Exact reduction: ``rel_emb = 0`` is causal softmax attention (tested).
    """
    if k.dim() != 4 or v.dim() != 4 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"q [B, Tq, Hq, D], k and v [B, Tk, Hkv, D] with Hq a multiple of Hkv expected, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    Tq, Tk = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = relative_logits(q, rel_emb, Tk) * scale
    logits = logits.masked_fill(_future(Tq, Tk, q.device), float("-inf"))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=logits,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def relative_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor, *, scale: float | None = None
) -> Tensor:
    """The dense formula with Shaw-style gathered embeddings: ``softmax((QK^T + S_rel) * scale
    + causal mask) V`` in plain matmuls. Same shapes as ``relative_attention``."""
    Tq, Tk, Hq, Hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = expand_kv_heads(k, Hq // Hkv, dim=2)
    v = expand_kv_heads(v, Hq // Hkv, dim=2)
    logits = (
        torch.einsum("bihd,bjhd->bhij", q, k) + relative_logits_gather(q, rel_emb, Tk)
    ) * scale
    weights = torch.softmax(logits.masked_fill(_future(Tq, Tk, q.device), float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", weights, v)
