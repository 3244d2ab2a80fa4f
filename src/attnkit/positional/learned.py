"""Learned relative-position biases: one trained scalar per head and (clipped or bucketed)
offset ``j - i`` between key and query.

- ``RelativePositionBias``: offsets clipped at ``±max_distance`` ("Self-Attention with
  Relative Position Representations", Shaw, Uszkoreit, Vaswani, 2018, scalar form).
- ``T5RelativeBias``: T5's log-spaced buckets ("Exploring the Limits of Transfer Learning with
  a Unified Text-to-Text Transformer", Raffel et al., 2020).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.positional.bias import Bias, learnable


class RelativePositionBias(Bias):
    """Learned relative-position bias: one scalar per head and clipped offset ``j - i``.

    ``table`` is ``[H, 2 * max_distance + 1]``; offsets beyond ``±max_distance`` share the end
    entries (Shaw et al., 2018, scalar form; as in Swin/T5 without buckets).
    """

    name = "relative_bias"
    offset_only = True

    def __init__(self, table: Tensor, max_distance: int):
        if table.dim() != 2 or table.shape[1] != 2 * max_distance + 1:
            raise ValueError(
                f"relative bias table must be [H, 2*max_distance+1] = [H, {2 * max_distance + 1}],"
                f" got {tuple(table.shape)}"
            )
        self.table, self.max_distance = table, max_distance

    @property
    def num_heads(self) -> int:
        return self.table.shape[0]

    def value(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        offset = (k_pos - q_pos).clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.table[h, offset]

    def parameters(self) -> list[Tensor]:
        return learnable([self.table])

    def _tensors(self) -> list[Tensor]:
        return [self.table]

    def to(self, dtype: torch.dtype) -> Bias:
        return RelativePositionBias(self.table.to(dtype), self.max_distance)


def relative_bias(
    num_heads: int,
    max_distance: int,
    table: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Bias:
    """Learned relative-position bias. Creates a trainable table (``N(0, 0.02)``) unless one
    is given; the returned object's ``table`` is the tensor to optimise."""
    if table is None:
        table = torch.randn(num_heads, 2 * max_distance + 1, generator=generator) * 0.02
        table.requires_grad_(True)
    if table.shape[0] != num_heads:
        raise ValueError(f"relative bias table has {table.shape[0]} heads, expected {num_heads}")
    return RelativePositionBias(table, max_distance)


# -- T5 -------------------------------------------------------------------------------------


def _check_t5_sizes(num_buckets: int, max_distance: int, bidirectional: bool) -> None:
    per_side = num_buckets // 2 if bidirectional else num_buckets
    exact = per_side // 2
    if exact < 1:
        smallest = 4 if bidirectional else 2
        raise ValueError(
            f"T5 bias needs num_buckets >= {smallest} "
            f"({'bidirectional' if bidirectional else 'causal'}), got {num_buckets}"
        )
    if max_distance <= exact:
        raise ValueError(
            f"T5 bias max_distance ({max_distance}) must exceed the {exact} exactly-bucketed "
            "distances; raise max_distance or lower num_buckets"
        )


def t5_relative_bucket(
    relative_position: Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """T5's bucket id (int64, same shape) for each ``relative_position = key - query``.

    Raffel et al. (2020), "Exploring the Limits of Transfer Learning with a Unified
    Text-to-Text Transformer": bidirectional attention gives each direction half of the
    buckets (keys after the query in the upper half); causal attention gives all buckets to
    keys at or before the query (later keys share bucket 0). Within a direction, the first half
    of its buckets hold distances ``0, 1, ...`` one each; the rest cover distances up to
    ``max_distance`` on a log scale (truncated toward zero in float32, as T5 does), and every
    farther distance shares the last bucket.
    """
    _check_t5_sizes(num_buckets, max_distance, bidirectional)
    if bidirectional:
        per_side = num_buckets // 2
        side = (relative_position > 0).long() * per_side
        distance = relative_position.abs()
    else:
        per_side = num_buckets
        side = torch.zeros_like(relative_position, dtype=torch.long)
        distance = (-relative_position).clamp_min(0)
    exact = per_side // 2
    # Clamped so log never sees 0; those distances take the exact branch below.
    log_ratio = torch.log(distance.clamp_min(exact).float() / exact) / math.log(
        max_distance / exact
    )
    far = (exact + (log_ratio * (per_side - exact)).long()).clamp_max(per_side - 1)
    return side + torch.where(distance < exact, distance, far).long()


class T5RelativeBias(Bias):
    """T5's bucketed relative-position bias: ``bias = table[bucket(pos_j - pos_i), h]``.

    Raffel et al. (2020), "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer". ``table`` is ``[num_buckets, H]`` (T5's ``relative_attention_bias`` weight);
    ``t5_relative_bucket`` defines the buckets. Offsets beyond ``±max_distance`` share the last
    bucket of their direction, so the bucket of every offset is read from a lookup table of
    ``2 * max_distance + 1`` entries (T5's float32 math, built once per device): the dense,
    tiled and FlexAttention paths agree bucket for bucket. T5 itself scales no scores by
    ``1/sqrt(D)``; pass ``scale=1.0`` to ``attnkit.attention`` to reproduce that.
    """

    name = "t5_bias"
    offset_only = True

    def __init__(self, table: Tensor, max_distance: int = 128, bidirectional: bool = True):
        if table.dim() != 2:
            raise ValueError(
                f"T5 bias table must be [num_buckets, H], got a {table.dim()}-D tensor"
            )
        _check_t5_sizes(table.shape[0], max_distance, bidirectional)
        self.table, self.max_distance, self.bidirectional = table, max_distance, bidirectional
        self._buckets: dict[torch.device, Tensor] = {}

    def buckets(self, device: torch.device | None = None) -> Tensor:
        """Bucket id of each offset ``-max_distance..max_distance`` (int64 ``[2 md + 1]``),
        cached per device so that a table moved with its module finds its lookup table."""
        device = self.table.device if device is None else torch.device(device)
        if device not in self._buckets:
            offsets = torch.arange(-self.max_distance, self.max_distance + 1, device=device)
            self._buckets[device] = t5_relative_bucket(
                offsets, self.bidirectional, self.num_buckets, self.max_distance
            )
        return self._buckets[device]

    @property
    def num_heads(self) -> int:
        return self.table.shape[1]

    @property
    def num_buckets(self) -> int:
        return self.table.shape[0]

    def value(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        offset = (k_pos - q_pos).clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.table[self.buckets()[offset], h]

    def parameters(self) -> list[Tensor]:
        return learnable([self.table])

    def _tensors(self) -> list[Tensor]:
        return [self.table]

    def to(self, dtype: torch.dtype) -> Bias:
        return T5RelativeBias(self.table.to(dtype), self.max_distance, self.bidirectional)


def t5_bias(
    num_heads: int,
    num_buckets: int = 32,
    max_distance: int = 128,
    bidirectional: bool = True,
    table: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Bias:
    """T5 bucketed relative bias (``T5RelativeBias``). T5's defaults: 32 buckets, max distance
    128; ``bidirectional=False`` for decoder self-attention. Creates a trainable
    ``[num_buckets, H]`` table (``N(0, 0.02)``, on ``device``) unless one is given."""
    if table is None:
        table = torch.randn(num_buckets, num_heads, generator=generator) * 0.02
        table = table.to(device).requires_grad_(True)
    if table.shape != (num_buckets, num_heads):
        raise ValueError(
            f"T5 bias table must be [num_buckets, H] = [{num_buckets}, {num_heads}], "
            f"got {tuple(table.shape)}"
        )
    return T5RelativeBias(table, max_distance, bidirectional)
