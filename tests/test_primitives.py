"""The shared primitives, each against an independent formula."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit import masks, scores
from attnkit.call import AttentionCall
from attnkit.masks.base import EMPTY, FULL, PARTIAL
from attnkit.primitives import (
    TileRun,
    accumulation_dtype,
    expand_kv_heads,
    finite_or_zero,
    live_tile_runs,
)


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


def _runs_by_hand(kinds: list[int], max_tiles: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """Maximal non-EMPTY stretches, each cut into chunks of ``max_tiles`` from its left end."""
    runs, j = [], 0
    while j < len(kinds):
        if kinds[j] == EMPTY:
            j += 1
            continue
        end = j
        while end < len(kinds) and kinds[end] != EMPTY:
            end += 1
        for first in range(j, end, max_tiles):
            stop = min(first + max_tiles, end)
            runs.append((first, stop, tuple(t for t in range(first, stop) if kinds[t] == PARTIAL)))
        j = end
    return runs


def test_live_tile_runs_of_a_hand_made_row() -> None:
    E, P, F = EMPTY, PARTIAL, FULL
    row = [E, F, F, P, F, F, E, E, P, E, F, F, F, F, F, P]
    assert live_tile_runs(row, 3) == [
        TileRun(1, 4, (3,)),
        TileRun(4, 6, ()),
        TileRun(8, 9, (8,)),
        TileRun(10, 13, ()),
        TileRun(13, 16, (15,)),
    ]
    assert [run.has_partial for run in live_tile_runs(row, 3)] == [True, False, True, False, True]
    assert live_tile_runs(row, 100) == [
        TileRun(1, 6, (3,)),
        TileRun(8, 9, (8,)),
        TileRun(10, 16, (15,)),
    ]
    assert live_tile_runs([E, E], 4) == []
    assert live_tile_runs([F] * 5, 2) == [TileRun(0, 2, ()), TileRun(2, 4, ()), TileRun(4, 5, ())]


@pytest.mark.parametrize("max_tiles", [1, 2, 5])
def test_live_tile_runs_match_the_stretches_of_random_rows(max_tiles: int) -> None:
    generator = torch.Generator().manual_seed(max_tiles)
    for _ in range(20):
        kinds = torch.randint(0, 3, (23,), generator=generator).tolist()
        got = [tuple(run) for run in live_tile_runs(kinds, max_tiles)]
        assert got == _runs_by_hand(kinds, max_tiles), kinds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finite_or_zero_replaces_only_minus_infinity(dtype: torch.dtype) -> None:
    lse = torch.tensor([[-float("inf"), -3.5, 0.0], [2.25, -float("inf"), 7.0]], dtype=dtype)
    expected = torch.tensor([[0.0, -3.5, 0.0], [2.25, 0.0, 7.0]], dtype=dtype)
    got = finite_or_zero(lse)
    assert got.dtype == dtype and torch.equal(got, expected)
    # the reason for it: an empty row's shifted weights are 0, not NaN
    lw = torch.full((2, 3), -float("inf"), dtype=dtype)
    assert torch.equal(
        torch.exp(lw - finite_or_zero(torch.logsumexp(lw, -1, keepdim=True))),
        torch.zeros(2, 3, dtype=dtype),
    )


def test_accumulation_dtype_widens_half_precision_and_keeps_float64() -> None:
    expected = {
        torch.float16: torch.float32,
        torch.bfloat16: torch.float32,
        torch.float32: torch.float32,
        torch.float64: torch.float64,
    }
    for dtype, wide in expected.items():
        assert accumulation_dtype(dtype) == wide
        # the widest of the input and float32, as torch promotes them
        assert torch.promote_types(dtype, torch.float32) == wide


def _scores_by_hand(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``s[b, h, i, j] = scale * q[b, i, h] . k[b, j, h // G]``, one head at a time."""
    G = q.shape[2] // k.shape[2]
    heads = [q[:, :, h] @ k[:, :, h // G].transpose(-1, -2) for h in range(q.shape[2])]
    return torch.stack(heads, dim=1) * scale


def _bottom_right_causal(Tq: int, Tk: int) -> torch.Tensor:
    return torch.arange(Tk).view(1, -1) <= torch.arange(Tq).view(-1, 1) + (Tk - Tq)


@pytest.mark.parametrize(("Tq", "Tk"), [(6, 6), (3, 7), (7, 4)])
def test_dense_softmax_weights_are_the_masked_softmax(Tq: int, Tk: int) -> None:
    q, k, v = torch.randn(2, Tq, 4, 8), torch.randn(2, Tk, 2, 8), torch.randn(2, Tk, 2, 8)
    call = AttentionCall(q, k, v, masks.causal(), scale=0.3)
    weights, lse = call.dense_weights(torch.float64)
    s = _scores_by_hand(q.double(), k.double(), 0.3)
    s = s.masked_fill(~_bottom_right_causal(Tq, Tk), -math.inf)
    expected_lse = torch.logsumexp(s, dim=-1)
    sees_a_key = _bottom_right_causal(Tq, Tk).any(-1)  # Tq > Tk: the first rows see none
    expected = torch.where(sees_a_key.view(-1, 1), torch.softmax(s, dim=-1), 0.0)
    assert weights.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(lse, expected_lse)


def test_dense_sigmoid_weights_are_unnormalised_unless_asked() -> None:
    q, k, v = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4)
    call = AttentionCall(q, k, v, score=scores.sigmoid(), scale=0.5)
    expected = torch.sigmoid(_scores_by_hand(q, k, 0.5) - math.log(5))
    weights, lse = call.dense_weights(torch.float32)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(lse, expected.sum(-1).log())
    normalised, _ = call.dense_weights(torch.float32, normalize=True)
    torch.testing.assert_close(normalised, expected / expected.sum(-1, keepdim=True))


def test_dense_cog_weights_are_signed_and_the_score_hook_sees_every_head() -> None:
    q, k, v = torch.randn(1, 5, 3, 4), torch.randn(1, 5, 3, 4), torch.randn(1, 5, 3, 4)
    call = AttentionCall(q, k, v, score=scores.cog())
    s = _scores_by_hand(q, k, 0.5)
    weights, _ = call.dense_weights(torch.float32)
    torch.testing.assert_close(weights, torch.sign(s) * torch.softmax(s.abs(), dim=-1))
    mixed, _ = call.dense_weights(torch.float32, lambda t: t.flip(1))
    s = s.flip(1)
    torch.testing.assert_close(mixed, torch.sign(s) * torch.softmax(s.abs(), dim=-1))


@pytest.mark.parametrize("score", [scores.softmax(), scores.sigmoid(), scores.cog()])
def test_tile_weights_are_that_part_of_the_dense_weights(score) -> None:
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 11, 2, 8), torch.randn(2, 11, 2, 8)
    call = AttentionCall(q, k, v, masks.sliding_window(4), score)
    weights, lse = call.dense_weights(torch.float32)
    rows, cols = torch.tensor([0, 3, 4, 8]), torch.arange(5, 11)
    s = _scores_by_hand(q[:, rows], k[:, cols], call.scale)
    lw = call.log_weights(s, rows, cols)
    tile = call.tile_weights(s, lw, lse[:, :, rows].unsqueeze(-1), rows, cols)
    torch.testing.assert_close(tile, weights[:, :, rows][:, :, :, cols])
