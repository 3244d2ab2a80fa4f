"""Gated positional self-attention (GPSA) of ConViT.

"ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases" (d'Ascoli,
Touvron, Leavitt, Morcos, Biroli, Sagun, 2021). On the ``N = H_g × W_g`` patches of an image,
head ``h`` mixes content attention with purely positional attention through a learned gate:

    A_h = (1 - σ(λ_h)) softmax(Q_h K_h^T / √d) + σ(λ_h) softmax(r_ij · v_pos,h)
    r_ij = (δx, δy, δx² + δy²),  (δx, δy) = (x_j - x_i, y_j - y_i) on the patch grid

The positional softmax is attention whose scores are only the bias ``r_ij · v_pos,h``: it is
``attnkit.attention`` with zero queries and keys and ``GridPositionBias``, so both terms run on
the fast backends and their sum is ``(1 - g) attention(q, k, v) + g attention(0, 0, v,
bias=...)`` (the bias: ``attnkit.positional.grid_bias``). ConViT renormalises ``A`` by its row
sums, which are already 1; it is omitted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.api import attention
from attnkit.positional.grid_bias import (
    GridPositionBias,
    check_grid,
    grid_relative_positions,
    locality_init,
)
from attnkit.primitives import expand_kv_heads


def _check_gpsa(q: Tensor, gate: Tensor, position_bias: GridPositionBias) -> None:
    if not isinstance(position_bias, GridPositionBias):
        raise TypeError(
            f"position_bias must be a GridPositionBias (see grid_position_bias), "
            f"got {type(position_bias).__name__}"
        )
    N, H = q.shape[1], q.shape[2]
    height, width = position_bias.grid
    if height * width != N:
        raise ValueError(
            f"GPSA runs over the {height}x{width} = {height * width} patches of its grid, "
            f"got {N} tokens; build the bias for this grid"
        )
    if gate.shape != (H,):
        raise ValueError(f"gate must be [H] = [{H}] (one logit per head), got {tuple(gate.shape)}")


def gated_positional_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    position_bias: GridPositionBias,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """GPSA over ``N`` patches: ``[B, N, Hq, Dv]``.

    d'Ascoli et al. (2021), "ConViT". ``q [B, N, Hq, D]``, ``k [B, N, Hkv, D]``,
    ``v [B, N, Hkv, Dv]``, ``gate [Hq]`` the logits ``λ_h``, ``position_bias`` a
    ``GridPositionBias`` for the ``N = H_g * W_g`` patch grid. Computes

        (1 - σ(λ)) attention(q, k, v) + σ(λ) attention(0, 0, v, bias=position_bias)

    where the second call's zero queries and keys have head dim 1, so it costs one bias pass and
    no ``QK^T``; both calls take ``backend``.

    Exact reductions (tested): ``λ = -inf`` is plain softmax attention; ``λ = +inf`` is pure
    positional attention, and with a zero ``weight`` that is the mean of ``v``.
    """
    _check_gpsa(q, gate, position_bias)
    B, N, Hq = q.shape[:3]
    content = attention(q, k, v, scale=scale, backend=backend)
    zeros_q = q.new_zeros(B, N, Hq, 1)
    zeros_k = k.new_zeros(B, N, k.shape[2], 1)
    positional = attention(zeros_q, zeros_k, v, bias=position_bias, backend=backend)
    g = torch.sigmoid(gate).to(content.dtype).view(1, 1, Hq, 1)
    return (1 - g) * content + g * positional


def gated_positional_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    weight: Tensor,
    grid: tuple[int, int],
    *,
    scale: float | None = None,
) -> Tensor:
    """ConViT's formula, dense: ``A = (1 - σ(λ)) softmax(QK^T scale) + σ(λ) softmax(r · v_pos)``
    with ``r = grid_relative_positions(grid)`` and ``weight [Hq, 3] = v_pos``, then ``A V``.
    Same shapes as ``gated_positional_attention``."""
    Hq, Hkv = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = expand_kv_heads(k, Hq // Hkv, dim=2), expand_kv_heads(v, Hq // Hkv, dim=2)
    content = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * scale, dim=-1)
    r = grid_relative_positions(grid, q.device).to(weight.dtype)
    positional = torch.softmax(torch.einsum("ijc,hc->hij", r, weight), dim=-1).to(q.dtype)
    g = torch.sigmoid(gate).to(q.dtype).view(1, -1, 1, 1)
    weights = (1 - g) * content + g * positional
    return torch.einsum("bhij,bjhd->bihd", weights, v)


class GPSA(nn.Module):
    """ConViT's gated positional self-attention layer: ``x [B, N, d_model] -> [B, N, d_model]``.

    d'Ascoli et al. (2021), "ConViT". ``N`` must be ``grid[0] * grid[1]`` patches (ConViT adds
    its class token only after the GPSA layers). Parameters as ConViT: ``qk`` (one projection
    for queries and keys), ``v`` (initialised to the identity), ``proj``, ``pos_weight``
    ``[H, 3]`` (``locality_init``; ConViT's ``pos_proj`` also has a bias, a constant per row
    that softmax ignores, so it is left out) and ``gate`` ``[H]`` (the ``λ_h``, initialised to
    1). Calls ``gated_positional_attention``.

    Exact reduction: with ``gate = -inf`` this is multi-head self-attention with the same
    ``qk``, ``v`` and ``proj`` weights.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        grid: tuple[int, int],
        *,
        locality_strength: float = 1.0,
        qkv_bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads, self.grid, self.backend = n_heads, check_grid(grid), backend
        self.qk = nn.Linear(d_model, 2 * d_model, bias=qkv_bias)
        self.v = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.proj = nn.Linear(d_model, d_model)
        self.pos_weight = nn.Parameter(locality_init(n_heads, locality_strength))
        self.gate = nn.Parameter(torch.ones(n_heads))
        with torch.no_grad():
            self.v.weight.copy_(torch.eye(d_model))

    def forward(self, x: Tensor) -> Tensor:
        B, N, d_model = x.shape
        head_dim = d_model // self.n_heads
        q, k = self.qk(x).view(B, N, 2, self.n_heads, head_dim).unbind(2)
        v = self.v(x).view(B, N, self.n_heads, head_dim)
        bias = GridPositionBias(self.pos_weight, self.grid)
        out = gated_positional_attention(q, k, v, self.gate, bias, backend=self.backend)
        return self.proj(out.reshape(B, N, d_model))
