"""The shared primitives, each against an independent formula."""

from __future__ import annotations

import pytest
import torch

from attnkit import masks
from attnkit.primitives import expand_kv_heads


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_expand_kv_heads_gives_query_head_h_the_kv_head_h_over_groups(groups: int) -> None:
    k = torch.randn(2, 5, 4, 3)  # [B, T, Hkv, D]
    expanded = expand_kv_heads(k, groups, dim=2)
    assert expanded.shape == (2, 5, 4 * groups, 3)
    for h in range(4 * groups):
        assert torch.equal(expanded[:, :, h], k[:, :, h // groups])
    heads_first = expand_kv_heads(k.transpose(1, 2), groups, dim=1)
    assert torch.equal(heads_first, expanded.transpose(1, 2))


def _top_left_causal(Tq: int, Tk: int) -> torch.Tensor:
    """What a kernel's causal flag computes: key ``j`` for query ``i`` when ``j <= i``."""
    return torch.arange(Tk).view(1, -1) <= torch.arange(Tq).view(-1, 1)


def test_only_causal_itself_is_plain_causal() -> None:
    assert masks.causal().is_plain_causal
    not_causal = [
        masks.full(),
        masks.sliding_window(3),
        masks.sliding_window(10_000),  # covers every key of small calls, still a window
        masks.sliding_window(0, 2),
        masks.sinks(2),
        masks.causal() & masks.sinks(2),
        masks.causal() | masks.sinks(2),
        ~masks.causal(),
    ]
    for mask in not_causal:
        assert not mask.is_plain_causal, mask


@pytest.mark.parametrize(("Tq", "Tk"), [(7, 7), (1, 7), (3, 7), (7, 3)])
def test_top_left_causal_exactly_where_a_causal_flag_computes_causal(Tq: int, Tk: int) -> None:
    causal = masks.causal()
    same_pattern = torch.equal(causal.dense(Tq, Tk)[0, 0], _top_left_causal(Tq, Tk))
    assert causal.is_top_left_causal(Tq, Tk) == same_pattern == (Tq == Tk)
    for mask in (masks.sliding_window(2), masks.causal() & masks.sinks(1), masks.full()):
        assert not mask.is_top_left_causal(Tq, Tk), mask
