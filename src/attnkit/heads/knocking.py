"""Knocking-heads attention: projections shared by all heads, applied before attention.

"Knocking-Heads Attention" (Zhou, Chen, Chen, Lan, Li, 2025), §3.2-3.3. After the per-head
projections ``Q_i = X W_i^Q`` (likewise K, V) and before attention, every head's features go
through the same learned map, so heads interact through shared weights while keeping their
own projections:

    KHA-Linear:  Q~_i = Q_i T^Q,  K~_i = K_i T^K,  V~_i = V_i T^V     (T: [D, D], shared)
    KHA-MLP:     V~_i = 2 * ((V_i W_up) * sigmoid(V_i W_gate)) W_down (W: [D, D], shared)

Initialisation makes every map the identity: ``T``, ``W_up``, ``W_down`` diagonal (identity),
``W_gate`` zero (``2 * sigmoid(0) = 1``). The paper finds ``T^V`` the important one
(``T^Q``/``T^K`` optional) and the MLP on values best. Here the maps act before RoPE (they are
part of the projection), so the linear variant folds into the projections after training
(``absorbed()``, eq. 8: ``W_i' = W_i T``). With GQA, ``T^K``/``T^V`` are shared by the KV heads.

Exact reduction: at initialisation (identity maps) the layout equals ``GroupedQueryAttention``
with the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.heads.base import Rotary, default_positions, rotate, softmax_head
from attnkit.heads.gqa import GroupedQueryAttention


class LinearKnock(nn.Module):
    """``t [..., D] -> t @ T`` with ``T [D, D]`` starting at the identity (KHA-Linear, Zhou et
    al., 2025, "Knocking-Heads Attention")."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))

    def forward(self, t: Tensor) -> Tensor:
        return t @ self.weight


class GatedMLPKnock(nn.Module):
    """``t [..., D] -> 2 ((t W_up) * sigmoid(t W_gate)) W_down`` (KHA-MLP); ``W_up``, ``W_down``
    start at the identity and ``W_gate`` at zero, so the map starts as the identity (KHA-MLP,
    Zhou et al., 2025, "Knocking-Heads Attention")."""

    def __init__(self, dim: int):
        super().__init__()
        self.up = nn.Parameter(torch.eye(dim))
        self.gate = nn.Parameter(torch.zeros(dim, dim))
        self.down = nn.Parameter(torch.eye(dim))

    def forward(self, t: Tensor) -> Tensor:
        return 2 * ((t @ self.up) * torch.sigmoid(t @ self.gate)) @ self.down


#: Knocking-heads variant -> the shared map applied to each head's features.
KNOCKS: dict[str, type[nn.Module]] = {"linear": LinearKnock, "mlp": GatedMLPKnock}

#: Which projection output each target transforms (index into ``project``'s ``(q, k, v)``).
TARGETS = {"q": 0, "k": 1, "v": 2}


class KnockingHeadsAttention(GroupedQueryAttention):
    """KHA (Zhou et al., 2025, "Knocking-Heads Attention") on GQA projections:
    ``[B, T, C] -> [B, T, Hq, D]``.

    Args:
        d_model, n_heads, head_dim, n_kv_heads, bias: as ``GroupedQueryAttention``.
        variant: ``"linear"`` or ``"mlp"`` (``KNOCKS``); default the paper's best, MLP.
        targets: which of ``"q"``, ``"k"``, ``"v"`` get a shared map; default ``("v",)``.
    The maps are ``knocks[target]`` (``knocks.v.up`` etc.).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
        variant: str = "mlp",
        targets: tuple[str, ...] = ("v",),
    ):
        super().__init__(d_model, n_heads, head_dim, n_kv_heads=n_kv_heads, bias=bias)
        if variant not in KNOCKS:
            raise ValueError(
                f"unknown knocking-heads variant {variant!r}; use one of {list(KNOCKS)}"
            )
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"targets must be distinct names from {list(TARGETS)} (at least one), "
                f"got {targets!r}"
            )
        self.variant, self.targets = variant, tuple(targets)
        self.knocks = nn.ModuleDict({t: KNOCKS[variant](head_dim) for t in self.targets})

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = list(super().project(x))
        for target, knock in self.knocks.items():
            qkv[TARGETS[target]] = knock(qkv[TARGETS[target]])
        q, k, v = qkv
        return q, k, v

    def absorbed(self) -> GroupedQueryAttention:
        """The plain GQA layout with the linear maps folded into the projections (eq. 8):
        per head, ``W_i' = W_i T`` and ``b_i' = b_i T``. Same outputs, no extra cost."""
        if self.variant != "linear":
            raise ValueError(
                f"only the linear variant folds into the projections; {self.variant!r} is "
                "non-linear"
            )
        weight = self.q_proj.weight
        gqa = GroupedQueryAttention(
            self.d_model,
            self.n_heads,
            self.head_dim,
            n_kv_heads=self.n_kv_heads,
            bias=self.has_bias,
        ).to(device=weight.device, dtype=weight.dtype)
        gqa.load_state_dict(self.state_dict(), strict=False)
        with torch.no_grad():
            for target, knock in self.knocks.items():
                proj = getattr(gqa, f"{target}_proj")
                T = knock.weight
                proj.weight.copy_(
                    (T.T @ proj.weight.unflatten(0, (-1, self.head_dim))).flatten(0, 1)
                )
                if self.has_bias:
                    proj.bias.copy_((proj.bias.unflatten(0, (-1, self.head_dim)) @ T).flatten())
        return gqa


def knocking_heads_reference(
    x: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    maps: dict[str, dict[str, Tensor]],
    *,
    n_heads: int,
    n_kv_heads: int,
    rotary: Rotary | None = None,
    positions: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """KHA as the paper's eqs. (5)-(9), head by head: ``[B, T, Hq, D]``. ``maps[target]`` is
    ``{"weight": T}`` (linear) or ``{"up", "gate", "down"}`` (MLP) for targets "q", "k", "v";
    a missing target is the identity."""
    D = q_weight.shape[0] // n_heads
    positions = default_positions(x, positions)

    def knock(target: str, t: Tensor) -> Tensor:
        m = maps.get(target)
        if m is None:
            return t
        if "weight" in m:
            return t @ m["weight"]
        return 2 * ((t @ m["up"]) * torch.sigmoid(t @ m["gate"])) @ m["down"]

    def head(weight: Tensor, i: int) -> Tensor:
        return x @ weight[i * D : (i + 1) * D].T

    def rope(t: Tensor) -> Tensor:
        return rotate(rotary, t.unsqueeze(2), positions).squeeze(2)

    outputs = []
    for h in range(n_heads):
        g = h // (n_heads // n_kv_heads)
        q = rope(knock("q", head(q_weight, h)))
        k = rope(knock("k", head(k_weight, g)))
        v = knock("v", head(v_weight, g))
        outputs.append(softmax_head(q, k, v, causal))
    return torch.stack(outputs, dim=2)
