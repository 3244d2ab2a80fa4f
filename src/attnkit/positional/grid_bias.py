"""ConViT's positional scores on a patch grid, as an additive bias.

"ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases" (d'Ascoli,
Touvron, Leavitt, Morcos, Biroli, Sagun, 2021). On the ``N = H_g × W_g`` patches of an image,
the positional score of head ``h`` between patches ``i`` and ``j`` is

    r_ij · v_pos,h,   r_ij = (δx, δy, δx² + δy²),  (δx, δy) = (x_j - x_i, y_j - y_i)

``GridPositionBias`` adds it to the scores; ``locality_init`` sets ``v_pos`` so that each head
attends around one offset. The gated layer that mixes it with content attention is
``attnkit.variants.gpsa``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.positional.bias import Bias, learnable


def check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"grid must be (height, width) in patches, two positive ints, got {grid}")
    return grid[0], grid[1]


def grid_relative_positions(grid: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """ConViT's ``r_ij = (x_j - x_i, y_j - y_i, (x_j - x_i)² + (y_j - y_i)²)`` for patches in
    row-major order (patch ``p`` at row ``y = p // W``, column ``x = p % W``): ``[N, N, 3]``
    float32, ``N = H * W``."""
    height, width = check_grid(grid)
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
        self.weight, self.grid = weight, check_grid(grid)

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
