"""Gated positional self-attention (GPSA) of ConViT.

"ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases" (d'Ascoli,
Touvron, Leavitt, Morcos, Biroli, Sagun, 2021). On the ``N = H_g × W_g`` patches of an image,
head ``h`` mixes content attention with purely positional attention through a learned gate:

    A_h = (1 - σ(λ_h)) softmax(Q_h K_h^T / √d) + σ(λ_h) softmax(r_ij · v_pos,h)
    r_ij = (δx, δy, δx² + δy²),  (δx, δy) = (x_j - x_i, y_j - y_i) on the patch grid

The positional softmax is attention whose scores are only the bias ``r_ij · v_pos,h``: it is
``attnkit.attention`` with zero queries and keys and ``GridPositionBias``, so both terms run on
the fast backends and their sum is ``(1 - g) attention(q, k, v) + g attention(0, 0, v,
bias=...)``. ConViT renormalises ``A`` by its row sums, which are already 1; it is omitted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.api import attention
from attnkit.positional.bias import Bias, learnable


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"grid must be (height, width) in patches, two positive ints, got {grid}")
    return grid[0], grid[1]


def grid_relative_positions(grid: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """ConViT's ``r_ij = (x_j - x_i, y_j - y_i, (x_j - x_i)² + (y_j - y_i)²)`` for patches in
    row-major order (patch ``p`` at row ``y = p // W``, column ``x = p % W``): ``[N, N, 3]``
    float32, ``N = H * W``."""
    height, width = _check_grid(grid)
    p = torch.arange(height * width, device=device)
    dx = (p % width).view(1, -1) - (p % width).view(-1, 1)
    dy = (p // width).view(1, -1) - (p // width).view(-1, 1)
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1).float()


class GridPositionBias(Bias):
    """ConViT's positional scores ``r_ij · v_pos,h`` as a bias: ``weight [H, 3]`` holds
    ``v_pos,h`` (coefficients of δx, δy and δx² + δy²) on a ``grid = (H_g, W_g)`` patch grid.

    d'Ascoli et al. (2021), "ConViT". Positions are row-major patch indices; a call's ``Tq`` and
    ``Tk`` must equal ``H_g * W_g`` (``gated_positional_attention`` checks this).
    """

    name = "grid_position"

    def __init__(self, weight: Tensor, grid: tuple[int, int]):
        if weight.dim() != 2 or weight.shape[1] != 3:
            raise ValueError(f"grid position weight must be [H, 3], got {tuple(weight.shape)}")
        self.weight, self.grid = weight, _check_grid(grid)

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    def value(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        width = self.grid[1]
        dx = k_pos % width - q_pos % width
        dy = k_pos // width - q_pos // width
        w = self.weight
        return w[h, 0] * dx + w[h, 1] * dy + w[h, 2] * (dx * dx + dy * dy)

    def parameters(self) -> list[Tensor]:
        return learnable([self.weight])

    def _tensors(self) -> list[Tensor]:
        return [self.weight]

    def to(self, dtype: torch.dtype) -> Bias:
        return GridPositionBias(self.weight.to(dtype), self.grid)


def locality_init(
    num_heads: int, locality_strength: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """ConViT's local initialisation of ``v_pos`` ``[H, 3]``.

    With ``k = floor(sqrt(H))``, head ``h1 + k h2`` (``h1, h2 < k``) gets
    ``α (2 (h2 - c), 2 (h1 - c), -1)``, ``c`` the centre of ``0..k-1``, ``α`` the locality
    strength: its scores ``-α ((δx - (h2 - c))² + (δy - (h1 - c))²)`` (up to a constant) peak
    at offset ``(h2 - c, h1 - c)``, so the heads start as the taps of a ``k × k`` convolution.
    Heads beyond ``k²`` keep ConViT's default draw ``α N(0, 0.02)`` (truncated at ±2).
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads must be > 0, got {num_heads}")
    weight = torch.empty(num_heads, 3)
    nn.init.trunc_normal_(weight, std=0.02, generator=generator)
    k = math.isqrt(num_heads)
    center = (k - 1) / 2
    for h1 in range(k):
        for h2 in range(k):
            weight[h1 + k * h2] = torch.tensor([2 * (h2 - center), 2 * (h1 - center), -1.0])
    return weight * locality_strength


def grid_position_bias(
    num_heads: int,
    grid: tuple[int, int],
    locality_strength: float = 1.0,
    weight: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> GridPositionBias:
    """ConViT positional bias on a ``grid`` of patches; a trainable ``weight [H, 3]`` (on
    ``device``) with ConViT's local initialisation (``locality_init``) unless one is given."""
    if weight is None:
        weight = locality_init(num_heads, locality_strength, generator).to(device)
        weight.requires_grad_(True)
    if weight.shape != (num_heads, 3):
        raise ValueError(
            f"grid position weight must be [{num_heads}, 3], got {tuple(weight.shape)}"
        )
    return GridPositionBias(weight, grid)


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
    k = k.repeat_interleave(Hq // Hkv, dim=2)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
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
        self.n_heads, self.grid, self.backend = n_heads, _check_grid(grid), backend
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
