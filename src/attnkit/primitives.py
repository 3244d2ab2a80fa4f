"""Primitives shared by the backends, layouts and variants: one definition per concept.

- ``expand_kv_heads``: each key/value head repeated for the query heads of its GQA group.
"""

from __future__ import annotations

from torch import Tensor


def expand_kv_heads(x: Tensor, groups: int, dim: int) -> Tensor:
    """Each key/value head of ``x`` repeated ``groups`` times along ``dim``, so that query head
    ``h`` meets key/value head ``h // groups`` (GQA; ``groups = Hq // Hkv``, 1 for MHA).

    ``[B, T, Hkv, D] -> [B, T, Hkv * groups, D]`` with ``dim=2`` (the call layout), or
    ``[B, Hkv, T, D] -> [B, Hkv * groups, T, D]`` with ``dim=1`` (heads first). Always a new
    tensor, ``groups == 1`` included.
    """
    return x.repeat_interleave(groups, dim=dim)
