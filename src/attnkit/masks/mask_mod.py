"""Any FlexAttention ``mask_mod`` as a mask: ``masks.from_mask_mod(fn)``.

FlexAttention describes a pattern by a predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool``
(attention-gym's masks, or one's own). ``from_mask_mod`` turns it into a ``Mask``: its predicate
is ``fn`` itself, and its tiles are classified exactly by evaluating ``fn`` on every pair of each
tile — one query tile at a time and in bounded slices of keys, so memory stays
``O(block_q · KEY_SLICE)`` per batch entry and head whatever the length. The classification is
cached per sizes and device like every mask's, and ``fn`` must be a pure function of its
indices (and of tensors it closes over). The result composes with ``& | ~`` and the built-in
patterns, and runs on every backend.

Built-in patterns classify tiles analytically in time independent of the tile area; prefer
them where one fits. Bottom-right alignment (``Tq != Tk``) is ``fn``'s own business: it receives
the raw indices, as in FlexAttention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.masks.base import Mask
from attnkit.masks.patterns import _kinds

#: ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``, broadcasting over its arguments.
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

#: Keys evaluated per slice when classifying one query tile (bounds the predicate's buffer).
KEY_SLICE = 8192


class FromMaskMod(Mask):
    """A FlexAttention ``mask_mod`` with a batch size and head count (1: the same pattern for
    every batch entry / head, evaluated at ``b = 0`` / ``h = 0``)."""

    def __init__(self, fn: MaskMod, batch_size: int, num_heads: int, name: str):
        self.fn, self.batch, self.heads, self.name = fn, batch_size, num_heads, name

    @property
    def identity(self) -> tuple:
        return ("mask_mod", self.fn, self.batch, self.heads)

    @property
    def batch_size(self) -> int:
        return self.batch

    @property
    def num_heads(self) -> int:
        return self.heads

    def predicate(self, b, h, q, k, Tq, Tk):
        return self.fn(b, h, q, k)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        device = q_lo.device
        block_k = int(k_hi.flatten()[0] - k_lo.flatten()[0]) + 1
        widths = (k_hi - k_lo + 1).flatten()
        b = torch.arange(self.batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(self.heads, device=device).view(1, -1, 1, 1)
        keys_per_slice = max(block_k, KEY_SLICE // block_k * block_k)
        rows = []
        for lo, hi in zip(q_lo.flatten().tolist(), q_hi.flatten().tolist(), strict=True):
            q = torch.arange(lo, hi + 1, device=device).view(1, 1, -1, 1)
            counts = []  # allowed pairs per tile, slice by slice
            for start in range(0, Tk, keys_per_slice):
                stop = min(start + keys_per_slice, Tk)
                k = torch.arange(start, stop, device=device).view(1, 1, 1, -1)
                allowed = self.fn(b, h, q, k).expand(
                    self.batch, self.heads, hi + 1 - lo, stop - start
                )
                tiles = -(-(stop - start) // block_k)
                padded = F.pad(allowed, (0, tiles * block_k - (stop - start)), value=False)
                counts.append(padded.reshape(*allowed.shape[:3], tiles, block_k).sum(dim=(2, 4)))
            count = torch.cat(counts, dim=-1)
            rows.append(_kinds(count == (hi + 1 - lo) * widths, count == 0))
        return torch.stack(rows, dim=2)


def from_mask_mod(
    fn: MaskMod, *, batch_size: int = 1, num_heads: int = 1, name: str | None = None
) -> Mask:
    """A mask from a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    ``fn`` receives broadcastable integer tensors (``b [Bm,1,1,1]``, ``h [1,Hm,1,1]``,
    ``q_idx [1,1,Tq,1]``, ``kv_idx [1,1,1,Tk]`` or slices of them; scalars inside
    FlexAttention) and returns a bool tensor of their broadcast shape. ``batch_size`` /
    ``num_heads``: how many batch entries / heads the pattern distinguishes (1: the same for all,
    evaluated at 0), as FlexAttention's ``create_block_mask(B=None, H=None)``.
    """
    for what, size in (("batch_size", batch_size), ("num_heads", num_heads)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{what} must be a positive int (1: the same for all), got {size!r}")
    if not callable(fn):
        raise TypeError(f"from_mask_mod takes a mask_mod(b, h, q_idx, kv_idx), got {fn!r}")
    return FromMaskMod(fn, batch_size, num_heads, name or getattr(fn, "__name__", "mask_mod"))
