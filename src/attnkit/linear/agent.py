"""Agent attention — "Agent Attention: On the Integration of Softmax and Linear Attention",
Han, Ye, Han, Xia, Pan, Wan, Song, Huang (2024).

A quadruple ``(Q, A, K, V)`` with ``n << N`` agent tokens ``A`` (pooled from the queries): the
agents gather from the keys and values, then broadcast back to the queries,

    V_A = softmax(scale A K^T) V,         O = softmax(scale Q A^T) V_A

in ``O(N n d)``. The paper shows this is generalised linear attention with feature maps
``phi_q(Q) = softmax(Q A^T)`` and ``phi_k(K) = softmax(A K^T)^T``: ``O = phi_q(Q) phi_k(K)^T V``,
an ``N x N`` matrix of rank ``n`` — the reference form here. The paper's agent bias and
depth-wise convolution on ``V`` are layer parts and are left out.

The paper defines agent attention for vision and image generation only; it has no causal
variant, so this mechanism is non-causal (no recurrent form, no state).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.api import attention
from attnkit.linear._common import check_qkv, pick
from attnkit.primitives import accumulation_dtype, expand_kv_heads

PAPER = (
    "Agent Attention: On the Integration of Softmax and Linear Attention — Han, Ye, Han, Xia, "
    "Pan, Wan, Song, Huang (2024)"
)


def pool_agents(q: Tensor, num_agents: int) -> Tensor:
    """Agent tokens by average pooling of the queries over the sequence (the paper pools the
    image grid): ``q [B, N, H, D]`` -> ``[B, num_agents, H, D]``."""
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1:
        raise ValueError(f"num_agents must be an int >= 1, got {num_agents!r}")
    B, N, H, D = q.shape
    pooled = F.adaptive_avg_pool1d(q.permute(0, 2, 3, 1).reshape(B, H * D, N), num_agents)
    return pooled.view(B, H, D, num_agents).permute(0, 3, 1, 2)


def _reference(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, scale: float) -> Tensor:
    acc = accumulation_dtype(q.dtype)
    G = q.shape[2] // k.shape[2]
    qq, aa = q.to(acc), agents.to(acc)
    kk, vv = (expand_kv_heads(x.to(acc), G, dim=2) for x in (k, v))
    phi_q = torch.softmax(torch.einsum("bihd,bahd->bhia", qq, aa) * scale, dim=-1)
    phi_k = torch.softmax(torch.einsum("bahd,bjhd->bhaj", aa, kk) * scale, dim=-1)
    mixing = phi_q @ phi_k  # [B, H, N, N], rank n
    return torch.einsum("bhij,bjhe->bihe", mixing, vv).to(q.dtype)


def _fast(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, scale: float) -> Tensor:
    agent_values = attention(agents, k, v, scale=scale)
    return attention(q, agents, agent_values, scale=scale)


_FORMS = {"reference": _reference, "chunked": _fast}


def agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    agents: Tensor | None = None,
    num_agents: int = 16,
    scale: float | None = None,
    form: str = "chunked",
) -> Tensor:
    """Agent attention (Han et al., 2024), non-causal.

    Args:
        q, k, v: ``[B, N, Hq, D]``, ``[B, M, Hkv, D]``, ``[B, M, Hkv, Dv]`` (GQA allowed).
        agents: agent tokens ``[B, n, Hq, D]``; default: ``pool_agents(q, num_agents)``.
        num_agents: ``n`` when the agents are pooled.
        scale: ``1/sqrt(D)`` by default (both softmaxes).
        form: ``"chunked"`` (two ``attnkit.attention`` calls, ``O(N n)``) or ``"reference"``
            (the dense rank-``n`` generalised linear attention matrix).

    Returns:
        ``out [B, N, Hq, Dv]``.
    """
    check_qkv(q, k, v, same_length=False)
    agents = pool_agents(q, num_agents) if agents is None else agents
    if agents.dim() != 4 or agents.shape[0] != q.shape[0] or agents.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"agents must be [B, n, Hq, D] = [{q.shape[0]}, n, {q.shape[2]}, {q.shape[3]}], "
            f"got {tuple(agents.shape)}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    run = pick(_FORMS, form, "form of agent attention (non-causal: no recurrent form)")
    return run(q, k, v, agents.to(q.dtype), scale)
