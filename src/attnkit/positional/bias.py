"""The base of additive positional score biases: ``s_ij += bias(h, pos_i, pos_j)``.

A bias is one function of (head, query position, key position) written with broadcasting
tensor ops, so the same code builds the dense ``[H, Tq, Tk]`` bias for the reference and SDPA,
the per-tile bias of the chunked backend and the scalar ``score_mod`` term inside
FlexAttention. Query positions are bottom-right aligned
(``attnkit.masks.base.aligned_query_positions``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.masks.base import aligned_query_positions


class Bias:
    """Base of additive biases. Subclasses implement ``value`` and ``num_heads``; learned
    biases also ``parameters``, ``_tensors`` and ``to``."""

    name = "bias"
    #: True if the bias is a function of the head and the offset ``k_pos - q_pos`` alone (ALiBi,
    #: KERPLE, T5 buckets, relative tables): the block-sparse kernel then reads it as one
    #: ``[H, Tq + Tk - 1]`` table, from ``value(h, 0, offset)``.
    offset_only = False

    @property
    def num_heads(self) -> int:
        raise NotImplementedError

    def value(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bias for broadcastable head / query position / key position index tensors
        (``arange`` views for a dense matrix or a tile, 0-d tensors inside FlexAttention)."""
        raise NotImplementedError

    def parameters(self) -> list[Tensor]:
        """Learnable tensors whose gradients attention must produce (empty if fixed)."""
        return []

    def dense(self, Tq: int, Tk: int, device: torch.device | str = "cpu") -> Tensor:
        """Bias matrix ``[H, Tq, Tk]`` for a call with ``Tq`` queries and ``Tk`` keys.

        A fixed bias (no learnable parameters) is built once per size and device and cached on
        the object (building ``H x Tq x Tk`` values costs more than an attention call at long
        lengths); after changing its tensors in place, make a new bias object. Learnable
        biases are rebuilt every call so gradients flow.
        """
        if self.parameters():
            return self._build_dense(Tq, Tk, device)
        cache = self.__dict__.setdefault("_dense_cache", {})
        key = (Tq, Tk, str(device))
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[key] = self._build_dense(Tq, Tk, device)
        return cache[key]

    def _build_dense(self, Tq: int, Tk: int, device: torch.device | str) -> Tensor:
        h = torch.arange(self.num_heads, device=device).view(-1, 1, 1)
        q = aligned_query_positions(torch.arange(Tq, device=device), Tq, Tk).view(1, -1, 1)
        k = torch.arange(Tk, device=device).view(1, 1, -1)
        return self.value(h, q, k).expand(self.num_heads, Tq, Tk)

    def check(self, Hq: int, device: torch.device) -> None:
        if self.num_heads != Hq:
            raise ValueError(f"{self.name} bias has {self.num_heads} heads but q has {Hq} heads")
        for p in self._tensors():
            if p.device != device:
                raise ValueError(f"{self.name} bias lives on {p.device}, the call on {device}")

    def _tensors(self) -> list[Tensor]:
        return []

    def to(self, dtype: torch.dtype) -> Bias:
        """The same bias with its tensors cast (differentiably) to ``dtype``."""
        return self

    def __repr__(self) -> str:
        return self.name


def learnable(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors among ``tensors`` that require grad (a bias's ``parameters()``)."""
    return [t for t in tensors if t.requires_grad]
