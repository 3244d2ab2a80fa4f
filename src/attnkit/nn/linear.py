"""``LinearAttend``: a mechanism of the linear/recurrent family as a layer's per-head attention.

``attnkit.nn.Attention(AttentionConfig(mechanism="gla", ...))`` runs the family's chunked form
for training, its fastest form for prefill (``LinearMechanism.fastest_form``) and its recurrent
form for decoding, carrying each layer's fixed-size state in the cache (``StateCache``) instead
of keys and values. The extra inputs some mechanisms need are learned here, from the per-head
``q``/``k`` the layout hands over (the layout itself stays unchanged):

| mechanism            | learned here                                                    |
|----------------------|-----------------------------------------------------------------|
| gla, gla_bidirectional | gate(s) ``logsigmoid(k W + b) / 16`` per key dim (GLA's normaliser) |
| rat                  | gate ``sigmoid(k W + b)``                                       |
| based                | 16-dim feature projections of ``q`` and ``k``                   |
| aaren                | one learned query per head                                      |
| flare, flare_causal  | 16 learned latent queries per KV head                           |
| efficient_additive   | the scoring vector ``w`` per query head                         |

Others (linear attention, Lightning, RetNet, agent attention) need nothing learned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit import linear
from attnkit.linear.registry import BASED_FEATURE_DIM

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


#: Mechanism name -> ``factory(n_heads, n_kv_heads, head_dim) -> module(q, k) -> extras``.
LEARNED_EXTRAS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "gla": lambda H, Hkv, D: _Gate(D, _gla_gate, "log_gate"),
    "gla_bidirectional": lambda H, Hkv, D: _BidirectionalGates(D),
    "rat": lambda H, Hkv, D: _Gate(D, torch.sigmoid, "gate"),
    "based": lambda H, Hkv, D: _Features(D),
    "aaren": lambda H, Hkv, D: _Queries(1, H, D),
    "flare": lambda H, Hkv, D: _Queries(FLARE_LATENTS, Hkv, D, causal=False),
    "flare_causal": lambda H, Hkv, D: _Queries(FLARE_LATENTS, Hkv, D, causal=True),
    "efficient_additive": lambda H, Hkv, D: _ScoreVector(H, D),
}


class LinearAttend(nn.Module):
    """``attend(q, k, v)`` for a linear/recurrent mechanism; ``step(q, k, v, state)`` runs it
    with a carried state and returns ``(out, new_state)``.

    ``q [B, T, Hq, D]``, ``k``/``v`` ``[B, T, Hkv, D|Dv]`` -> ``[B, T, Hq, Dv]``. Several tokens
    (training, prefill; with ``step``, the state as the initial state) run in the mechanism's
    ``fastest_form``: the compiled recurrent kernel for CPU inference where it applies, else
    the chunked form. ``step`` runs one token in the recurrent form.
    """

    def __init__(self, name: str, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.mechanism = linear.get(name)
        factory = LEARNED_EXTRAS.get(name)
        self.learned = None if factory is None else factory(n_heads, n_kv_heads, head_dim)
        if not self.mechanism.gqa and n_kv_heads != n_heads:
            raise ValueError(
                f"{name} needs one key head per query head (its keys query the latents); "
                f"got {n_heads} query and {n_kv_heads} KV heads: use layout 'mha'"
            )

    @property
    def decodes(self) -> bool:
        """True if the mechanism can carry a state token by token (causal)."""
        return self.mechanism.causal and self.mechanism.state is not None

    def _inputs(self, q: Tensor, k: Tensor, v: Tensor, **options: Any) -> dict[str, Any]:
        # The registry's seeded example extras are replaced by the learned ones, not drawn.
        learned = {} if self.learned is None else self.learned(q, k)
        return {"q": q, "k": k, "v": v} | self.mechanism.options | learned | options

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        inputs = self._inputs(q, k, v)
        return self.mechanism.form(self.mechanism.fastest_form(inputs))(**inputs)

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: Any) -> tuple[Tensor, Any]:
        if not self.decodes:
            raise ValueError(
                f"{self.mechanism.name} is not causal (it sees the whole sequence): it cannot "
                "decode with a cache; run it without one"
            )
        inputs = self._inputs(q, k, v, initial_state=state, return_state=True)
        one_token = q.shape[1] == 1 and state is not None
        form = "recurrent" if one_token else self.mechanism.fastest_form(inputs)
        return self.mechanism.form(form)(**inputs)

    def extra_repr(self) -> str:
        return self.mechanism.name
