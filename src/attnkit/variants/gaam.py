"""GAAM: multi-head Gaussian adaptive attention over features.

"Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple
Modalities" (Ioannides, Chadha & Elkins, 2024; later versions titled "Density Adaptive
Attention"). GAAM does not compare queries with keys: it re-weights the entries of ``x`` along
one axis (features by default) with Gaussian densities around the data's own mean, shifted by
a learnable offset and widened by a learnable scale, one set per head.

What is implemented (the paper's equations, with the choices its authors' released code makes
where the equations are silent — ``gaussian_adaptive_attention.py`` of
github.com/gioannides/Gaussian-Adaptive-Attention). The axis is cut into ``H`` equal chunks,
one per head; for head ``h``, chunk ``x_h`` (``n`` entries along the axis) and Gaussians
``g = 1..G``:

    mu      = mean(x_h)                         over the axis
    sigma^2 = var(x_h) + eps                    unbiased (N - 1), as the released code
    y_g     = (x_h - (mu + delta_hg)) / sigma   delta: learnable mean offset
    G_g     = exp(-y_g^2 / (2 c_hg^2)) / sqrt(2 pi c_hg^2)   c^2 = xi, the learnable
                                                             scaled variance
    w_h     = prod_g G_g / max(sum_axis prod_g G_g, eps)     normalised over the axis
    out_h   = x_h * w_h

With one Gaussian this is the paper's ``y = x ⊙ exp(-x_norm^2 / 2 xi)``; several Gaussians per
head multiply (the released GAAM code; the later DAAM code mixes them with softmax weights
instead, which is not implemented here). The normalisation over the axis is the released
code's; the paper's equations leave the Gaussian unnormalised. Not included: the code's
``padding_value`` (entries equal to it still enter the mean as zeros there; mask or drop padded
entries before calling) and the Importance Factor, an analysis computed from ``weights``.

``gaussian_adaptive_weights`` computes the same weights vectorised over heads and Gaussians in
log space, ``w_h = softmax_axis(sum_g -y_g^2 / 2 c_hg^2)`` (the density constants cancel), so
it never underflows; the reference, which multiplies densities, differs only where their sum
falls below ``eps`` (then it returns weights ~0, the vectorised form a proper distribution).
As ``c -> inf`` every weight tends to ``1 / n``: the layer becomes ``x / n``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _head_size(x: Tensor, dim: int, mean_offset: Tensor, scale: Tensor) -> int:
    if mean_offset.dim() != 2 or mean_offset.shape != scale.shape:
        raise ValueError(
            f"mean_offset and scale must both be [H, G], got {tuple(mean_offset.shape)} and "
            f"{tuple(scale.shape)}"
        )
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a {x.dim()}-D input")
    heads, size = mean_offset.shape[0], x.shape[dim]
    if size % heads != 0 or size // heads < 2:
        raise ValueError(
            f"axis {dim} of x has {size} entries, which {heads} heads cannot split into equal "
            "chunks of at least 2 (the variance needs 2); choose num_heads dividing it"
        )
    return size // heads


def gaussian_adaptive_weights_reference(
    x: Tensor, mean_offset: Tensor, scale: Tensor, *, dim: int = -1, eps: float = 1e-8
) -> Tensor:
    """GAAM's weights head by head and Gaussian by Gaussian, as the module docstring writes
    them (Ioannides et al., 2024). ``x`` any shape; ``mean_offset``, ``scale`` ``[H, G]``.
    Returns weights shaped like ``x`` that sum to 1 over each head's chunk of ``dim``."""
    n = _head_size(x, dim, mean_offset, scale)
    weights = []
    for h, chunk in enumerate(x.split(n, dim=dim)):
        mean = chunk.mean(dim, keepdim=True)
        var = chunk.var(dim, keepdim=True) + eps
        mixture = torch.ones_like(chunk)
        for g in range(mean_offset.shape[1]):
            c = scale[h, g]
            y = (chunk - (mean + mean_offset[h, g])) / torch.sqrt(var)
            mixture = mixture * torch.exp(-(y**2) / (2 * c**2)) / torch.sqrt(2 * math.pi * c**2)
        weights.append(mixture / mixture.sum(dim, keepdim=True).clamp_min(eps))
    return torch.cat(weights, dim=dim)


def gaussian_adaptive_weights(
    x: Tensor, mean_offset: Tensor, scale: Tensor, *, dim: int = -1, eps: float = 1e-8
) -> Tensor:
    """GAAM's weights for all heads and Gaussians at once, in log space (see the module
    docstring). ``x`` any shape; ``mean_offset``, ``scale`` ``[H, G]``; returns weights shaped
    like ``x``."""
    n = _head_size(x, dim, mean_offset, scale)
    heads = mean_offset.shape[0]
    xh = x.movedim(dim, -1).unflatten(-1, (heads, n))  # [..., H, n]
    mean = xh.mean(-1, keepdim=True)
    sigma = torch.sqrt(xh.var(-1, keepdim=True) + eps)
    offset = mean_offset.to(x.dtype).unsqueeze(1)  # [H, 1, G]
    y = (xh.unsqueeze(-1) - mean.unsqueeze(-1) - offset) / sigma.unsqueeze(-1)  # [..., H, n, G]
    log_density = -(y**2) / (2 * scale.to(x.dtype).unsqueeze(1) ** 2)
    weights = torch.softmax(log_density.sum(-1), dim=-1)
    return weights.flatten(-2).movedim(-1, dim)


class GaussianAdaptiveAttention(nn.Module):
    """Multi-head Gaussian adaptive attention (GAAM): ``out = x * weights(x)``.

    "Gaussian Adaptive Attention is All You Need" (Ioannides, Chadha & Elkins, 2024); see the
    module docstring for the formula and what was followed. Learnable per head and Gaussian:
    a mean offset ``delta`` (init 0) and a scale ``c`` (init ``init_scale``; ``xi = c^2``).

    Args:
        num_heads: chunks the axis ``dim`` is split into (must divide its size).
        num_gaussians: Gaussians per head, multiplied together.
        dim: the axis re-weighted, e.g. ``-1`` for the features of ``[B, T, C]`` or ``1`` for
            its tokens.
        init_scale: initial ``c`` (the authors' later code starts at 2).
        eps: added to the variance and bounding the normaliser, as in the authors' code.

    Shapes: ``x`` any shape with ``x.shape[dim] % num_heads == 0``; output like ``x``.
    """

    def __init__(
        self,
        num_heads: int,
        num_gaussians: int = 1,
        *,
        dim: int = -1,
        init_scale: float = 2.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        for name, n in (("num_heads", num_heads), ("num_gaussians", num_gaussians)):
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.dim = dim
        self.eps = eps
        self.mean_offset = nn.Parameter(torch.zeros(num_heads, num_gaussians))
        self.scale = nn.Parameter(torch.full((num_heads, num_gaussians), float(init_scale)))

    def weights(self, x: Tensor) -> Tensor:
        """The Gaussian attention weights, shaped like ``x`` (sum 1 over each head's chunk)."""
        return gaussian_adaptive_weights(
            x, self.mean_offset, self.scale, dim=self.dim, eps=self.eps
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x * weights(x)``, shaped like ``x``."""
        return x * self.weights(x)

    def extra_repr(self) -> str:
        heads, gaussians = self.mean_offset.shape
        return f"num_heads={heads}, num_gaussians={gaussians}, dim={self.dim}"
