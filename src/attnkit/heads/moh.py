"""MoH: mixture-of-head attention — a router weights (and switches off) heads per token.

"MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin, Zhu, Yuan, Yan, 2024). MHA is a
sum over heads, ``O = sum_h H_h W_O^h``; MoH replaces it with ``O = sum_h g_h H_h W_O^h``.
The first ``n_shared`` heads are always on; of the other ``Hq - n_shared`` (routed) heads a
router picks the ``top_k`` per token. Two-stage routing, as in the authors' code:

    routed:  p = softmax(W_r x);  g_r = top_k * p / sum_{top_k} p  on the top-k, 0 elsewhere
    shared:  g_s = n_shared * softmax(W_s x)                      (1 when n_shared == 1)
    balance: [a_1, a_2] = 2 * softmax(W_h x);  g = [a_1 g_s ; a_2 g_r]

The factors ``top_k``, ``n_shared`` and 2 make uniform routing weigh every active head by 1,
so the weighted sum generalises MHA's plain sum. Each head's output is scaled by its gate here
and ``o_proj`` (outside the layout) applies the weighted sum. ``aux_loss`` holds the
load-balancing loss of the last forward (``top_k`` routed: ``E * sum_i mean(p_i) *
mean(selected_i)``, ``E`` routed heads), to be added to the training loss by the caller.

Exact reduction: with zero router weights and ``top_k = Hq - n_shared`` (all heads active,
every gate exactly 1) the layout equals ``GroupedQueryAttention`` with the same weights. Heads
a token does not select are still computed (then multiplied by 0): the compute saving needs a
token-sparse head kernel, which this dense form does not provide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.attend import Attend
from attnkit.heads.base import Rotary
from attnkit.heads.gqa import GroupedQueryAttention, gqa_reference


class MixtureOfHeadsAttention(GroupedQueryAttention):
    """MoH (Jin et al., 2024, "MoH: Multi-Head Attention as Mixture-of-Head Attention") on GQA
    projections: ``[B, T, C] -> [B, T, Hq, D]``, head ``h`` scaled by its gate.

    Args:
        d_model, n_heads, head_dim, n_kv_heads, bias: as ``GroupedQueryAttention``.
        n_shared: always-active heads (the first ``n_shared``); 0..Hq.
        top_k: routed heads active per token, 1..``Hq - n_shared`` (None = all, i.e. only the
            gates' weighting remains).
    Routers (bias-free ``nn.Linear``s on ``x``): ``router`` (``W_r``), ``shared_router``
    (``W_s``, if ``n_shared > 1``), ``head_type_router`` (``W_h``, if both kinds exist).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
        n_shared: int = 0,
        top_k: int | None = None,
    ):
        super().__init__(d_model, n_heads, head_dim, n_kv_heads=n_kv_heads, bias=bias)
        if not (isinstance(n_shared, int) and 0 <= n_shared <= n_heads):
            raise ValueError(f"n_shared must be an int in [0, n_heads={n_heads}], got {n_shared!r}")
        n_routed = n_heads - n_shared
        top_k = n_routed if top_k is None else top_k
        if n_routed and not (isinstance(top_k, int) and 1 <= top_k <= n_routed):
            raise ValueError(
                f"top_k must be an int in [1, n_heads - n_shared = {n_routed}], got {top_k!r}"
            )
        if n_routed == 0 and top_k:
            raise ValueError("top_k must be None or 0 when every head is shared (n_shared=n_heads)")
        self.n_shared, self.n_routed, self.top_k = n_shared, n_routed, top_k
        self.router = nn.Linear(d_model, n_routed, bias=False) if n_routed else None
        self.shared_router = nn.Linear(d_model, n_shared, bias=False) if n_shared > 1 else None
        self.head_type_router = nn.Linear(d_model, 2, bias=False) if n_shared and n_routed else None
        self.aux_loss: Tensor | None = None

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-token head gates ``[B, T, Hq]`` (shared heads first) and the load-balancing loss
        (None without routed heads)."""
        parts, aux = [], None
        if self.n_shared:
            shared = x.new_ones(*x.shape[:-1], self.n_shared)
            if self.shared_router is not None:
                shared = self.n_shared * torch.softmax(self.shared_router(x), dim=-1)
            parts.append(shared)
        if self.n_routed:
            p = torch.softmax(self.router(x), dim=-1)
            chosen = torch.zeros_like(p).scatter(-1, p.topk(self.top_k, dim=-1).indices, 1.0)
            kept = p * chosen
            parts.append(self.top_k * kept / kept.sum(-1, keepdim=True))
            aux = self.n_routed * (p.flatten(0, -2).mean(0) * chosen.flatten(0, -2).mean(0)).sum()
        if self.head_type_router is not None:
            balance = 2 * torch.softmax(self.head_type_router(x), dim=-1)
            parts = [part * balance[..., i : i + 1] for i, part in enumerate(parts)]
        return torch.cat(parts, dim=-1), aux

    def forward(
        self,
        x: Tensor,
        attend: Attend,
        rotary: Rotary | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        heads = super().forward(x, attend, rotary, positions)
        gates, self.aux_loss = self.gates(x)
        return heads * gates.unsqueeze(-1).to(heads.dtype)


def moh_reference(
    x: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    n_shared: int,
    top_k: int,
    router_weight: Tensor | None = None,
    shared_router_weight: Tensor | None = None,
    head_type_router_weight: Tensor | None = None,
    rotary: Rotary | None = None,
    positions: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """MoH as in Jin et al. (2024), token by token: ``g_h * head_h`` for every token,
    ``[B, T, Hq, D]`` (gates as in the module docstring)."""
    heads = gqa_reference(
        x,
        q_weight,
        k_weight,
        v_weight,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        rotary=rotary,
        positions=positions,
        causal=causal,
    )
    B, T, _ = x.shape
    n_routed = n_heads - n_shared
    gates = torch.zeros(B, T, n_heads, dtype=x.dtype, device=x.device)
    for b in range(B):
        for t in range(T):
            xt = x[b, t]
            shared = torch.ones(n_shared, dtype=x.dtype, device=x.device)
            if n_shared > 1:
                shared = n_shared * F.softmax(shared_router_weight @ xt, dim=-1)
            routed = torch.zeros(n_routed, dtype=x.dtype, device=x.device)
            if n_routed:
                p = F.softmax(router_weight @ xt, dim=-1)
                top = p.topk(top_k).indices
                routed[top] = top_k * p[top] / p[top].sum()
            a1, a2 = (1.0, 1.0)
            if n_shared and n_routed:
                a1, a2 = 2 * F.softmax(head_type_router_weight @ xt, dim=-1)
            gates[b, t] = torch.cat([a1 * shared, a2 * routed])
    return heads * gates.unsqueeze(-1)
