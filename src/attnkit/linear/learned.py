"""The extra inputs some linear mechanisms need, learned inside a layer from the per-head ``q``
and ``k`` a head layout hands over (``attnkit.nn.LinearAttend`` holds them; each record of
``attnkit.linear.registry`` names its factory as ``learned``):

| mechanism              | learned                                                              |
|------------------------|----------------------------------------------------------------------|
| gla, gla_bidirectional | gate(s) ``logsigmoid(k W + b) / 16`` per key dim (GLA's normaliser)  |
| rat                    | gate ``sigmoid(k W + b)``                                            |
| based                  | ``BASED_FEATURE_DIM``-dim feature projections of ``q`` and ``k``     |
| aaren                  | one learned query per head                                           |
| flare, flare_causal    | ``FLARE_LATENTS`` learned latent queries per KV head                 |
| efficient_additive     | the scoring vector ``w`` per query head                              |

Others (linear attention, Lightning, RetNet, agent attention) need nothing learned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: BASED's projected feature dimension.
BASED_FEATURE_DIM = 16
#: FLARE's latent queries per head.
FLARE_LATENTS = 16


class _Gate(nn.Module):
    def __init__(self, head_dim: int, activation: Callable[[Tensor], Tensor], key: str):
        super().__init__()
        self.proj = nn.Linear(head_dim, head_dim)
        self.activation, self.key = activation, key

    def forward(self, q: Tensor, k: Tensor) -> dict[str, Any]:
        return {self.key: self.activation(self.proj(k))}


class _Features(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.q_proj = nn.Linear(head_dim, BASED_FEATURE_DIM, bias=False)
        self.k_proj = nn.Linear(head_dim, BASED_FEATURE_DIM, bias=False)

    def forward(self, q: Tensor, k: Tensor) -> dict[str, Any]:
        return {"feature_q": self.q_proj(q), "feature_k": self.k_proj(k)}


class _Queries(nn.Module):
    """Learned query tokens ``[1, n, heads, D]``, passed as ``q`` (Aaren, FLARE)."""

    def __init__(self, n: int, heads: int, head_dim: int, **fixed: Any):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, n, heads, head_dim) / head_dim**0.25)
        self.fixed = fixed

    def forward(self, q: Tensor, k: Tensor) -> dict[str, Any]:
        queries = self.queries.to(q.dtype)
        if self.queries.shape[1] == 1:  # Aaren: one query per batch row
            queries = queries.expand(q.shape[0], -1, -1, -1)
        return {"q": queries} | self.fixed


class _ScoreVector(nn.Module):
    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_heads, head_dim) / head_dim**0.5)

    def forward(self, q: Tensor, k: Tensor) -> dict[str, Any]:
        return {"w": self.w.to(q.dtype)}


def _gla_gate(x: Tensor) -> Tensor:
    return F.logsigmoid(x) / 16


class _BidirectionalGates(nn.Module):
    """ViG: one gate per scan direction."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.forward_gate = _Gate(head_dim, _gla_gate, "log_gate")
        self.backward_gate = _Gate(head_dim, _gla_gate, "backward_log_gate")

    def forward(self, q: Tensor, k: Tensor) -> dict[str, Any]:
        return self.forward_gate(q, k) | self.backward_gate(q, k) | {"causal": False}


#: ``factory(n_heads, n_kv_heads, head_dim) -> module(q, k) -> extras``, per mechanism (the
#: records of ``attnkit.linear.registry`` name theirs).
def gla_gate(H: int, Hkv: int, D: int) -> nn.Module:
    return _Gate(D, _gla_gate, "log_gate")


def vig_gates(H: int, Hkv: int, D: int) -> nn.Module:
    return _BidirectionalGates(D)


def rat_gate(H: int, Hkv: int, D: int) -> nn.Module:
    return _Gate(D, torch.sigmoid, "gate")


def based_features(H: int, Hkv: int, D: int) -> nn.Module:
    return _Features(D)


def aaren_query(H: int, Hkv: int, D: int) -> nn.Module:
    return _Queries(1, H, D)


def flare_latents(causal: bool) -> Callable[[int, int, int], nn.Module]:
    def factory(H: int, Hkv: int, D: int) -> nn.Module:
        return _Queries(FLARE_LATENTS, Hkv, D, causal=causal)

    return factory


def additive_scores(H: int, Hkv: int, D: int) -> nn.Module:
    return _ScoreVector(H, D)
