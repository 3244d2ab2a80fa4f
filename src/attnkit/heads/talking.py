"""Talking-heads attention: learned mixing of the heads' logits and of their weights.

"Talking-Heads Attention" (Shazeer, Lan, Cheng, Ding, Hou, 2020). With per-head logits
``J[h] = q_h k_h^T / sqrt(D)``:

    L[m] = sum_h J[h] P_l[h, m]          (before the softmax)
    W[m] = softmax(L[m])                 (mask, bias and score function per head m)
    U[n] = sum_m W[m] P_w[m, n]          (after the softmax)
    o_n  = U[n] v_n

The paper allows different head counts for keys, logits and values; here all are ``Hq``
(square ``P_l``, ``P_w``, so the identity initialisation is MHA/GQA). With ``P_l = P_w = I``
the layout reduces exactly to ``GroupedQueryAttention`` with the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.attend import Attend
from attnkit.heads.base import Rotary, default_positions, rotate
from attnkit.heads.dense import dense_attend
from attnkit.heads.gqa import GroupedQueryAttention
from attnkit.primitives import expand_kv_heads


class TalkingHeadsAttention(GroupedQueryAttention):
    """Talking-heads attention (Shazeer et al., 2020, "Talking-Heads Attention") on GQA
    projections: ``[B, T, C] -> [B, T, Hq, D]``.

    Parameters ``logits_mix`` (``P_l``) and ``weights_mix`` (``P_w``), ``[Hq, Hq]``, start at the
    identity. Computes attention densely (``attnkit.heads.dense``) with ``attend``'s mask,
    score function, bias and scale; needs a plain ``Attend`` (no KV cache).
    """

    supports_kv_cache = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
    ):
        super().__init__(d_model, n_heads, head_dim, n_kv_heads=n_kv_heads, bias=bias)
        self.logits_mix = nn.Parameter(torch.eye(n_heads))
        self.weights_mix = nn.Parameter(torch.eye(n_heads))

    def forward(
        self,
        x: Tensor,
        attend: Attend,
        rotary: Rotary | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        attend = self.check_plain_attend(attend)
        q, k, v = self.qkv(x, rotary, positions)
        return dense_attend(
            attend,
            q,
            k,
            v,
            compose_scores=lambda s: mix_heads(s, self.logits_mix),
            compose_weights=lambda p: mix_heads(p, self.weights_mix),
        )


def mix_heads(a: Tensor, mix: Tensor) -> Tensor:
    """``a [B, H, Tq, Tk]``, ``mix [H, H']`` -> ``sum_h a[:, h] mix[h, m]``, ``[B, H', Tq, Tk]``
    (talking heads' mixing, Shazeer et al., 2020)."""
    return torch.einsum("bhqk,hm->bmqk", a, mix.to(a.dtype))


def talking_heads_reference(
    x: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    logits_mix: Tensor,
    weights_mix: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    rotary: Rotary | None = None,
    positions: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """Talking-heads attention as in Shazeer et al. (2020)'s pseudo-code, ``[B, T, Hq, D]``."""
    B, T, _ = x.shape
    D = q_weight.shape[0] // n_heads
    positions = default_positions(x, positions)
    q = rotate(rotary, (x @ q_weight.T).view(B, T, n_heads, D), positions)
    k = rotate(rotary, (x @ k_weight.T).view(B, T, n_kv_heads, D), positions)
    v = (x @ v_weight.T).view(B, T, n_kv_heads, D)
    k = expand_kv_heads(k, n_heads // n_kv_heads, dim=2)
    v = expand_kv_heads(v, n_heads // n_kv_heads, dim=2)
    J = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
    L = torch.einsum("bhqk,hm->bmqk", J, logits_mix)
    if causal:
        L = L.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), -torch.inf)
    W = torch.softmax(L, dim=-1)
    U = torch.einsum("bmqk,mn->bnqk", W, weights_mix)
    return torch.einsum("bnqk,bknd->bqnd", U, v)
