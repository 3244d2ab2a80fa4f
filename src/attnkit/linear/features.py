"""Feature maps that a ``LinearProblem`` can apply to its queries and keys itself.

A problem built with ``feature_map=name`` holds the raw queries and keys; the forms see
``phi(q)``, ``phi(k)``. The reason is cost, not convenience: the compiled chunked and
recurrent kernels (``attnkit/backends/csrc/linear_cpu.cpp``) apply the map to a block of
tokens in cache instead of reading features from memory. BASED's Taylor map turns 16 dims
into 273; even ``elu + 1`` applied to the whole input first writes two fresh tensors the size
of ``q`` and ``k``, a large part of a call's time (docs/kernels.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def taylor_feature_map(x: Tensor) -> Tensor:
    """``phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]``: ``[.., d]`` ->
    ``[.., 1 + d + d^2]``, with ``phi(q) . phi(k) = 1 + s + s^2 / 2``, ``s = q . k / sqrt(d)``
    (BASED, Arora et al., 2024)."""
    d = x.shape[-1]
    # The scale goes on the small factor: at long T each [.., d^2] temporary is hundreds of MB.
    outer = (x.unsqueeze(-1) * (x / math.sqrt(2.0 * d)).unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, outer], dim=-1)


def taylor_dim(d: int) -> int:
    return 1 + d + d * d


def elu_plus_one(x: Tensor) -> Tensor:
    """``elu(x) + 1``, positive (Katharopoulos et al., 2020)."""
    return F.elu(x).add_(1.0)


def _same_dim(d: int) -> int:
    return d


#: name -> (map, feature dimension for an input dimension)
FEATURES: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[int], int]]] = {
    "taylor": (taylor_feature_map, taylor_dim),
    "elu": (elu_plus_one, _same_dim),
    "relu": (F.relu, _same_dim),
}
