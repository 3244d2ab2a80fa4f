"""Policies: the vectorised selection equals each policy's per-head reference, budgets hold,
and an unlimited budget keeps everything."""

from __future__ import annotations

import pytest
import torch

from attnkit import kv
from attnkit.kv import StepView

B, HKV, L = 2, 3, 24


def make_view(seed: int = 0, first_call: bool = True, ties: bool = False) -> StepView:
    """Right-aligned rows of different lengths, a padding hole, random (or tied) scores."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, L + 1, (B, HKV), generator=g)
    slots = torch.arange(L)
    occupied = slots >= (L - lengths).unsqueeze(-1)
    attendable = occupied.clone()
    attendable[0, 1, -8] = False  # a padding key inside a row
    positions = torch.where(occupied, slots + 100, -1)
    scores = torch.rand(B, HKV, L, generator=g)
    if ties:
        scores = (scores * 3).floor()
    scores = scores.masked_fill(~attendable, 0.0)
    return StepView(
        layer=1,
        positions=positions,
        attendable=attendable,
        scores=scores,
        key_sums=scores * 0.5,
        new_tokens=1,
        seen=130,
        context=100,
        first_call=first_call,
    )


PER_HEAD = torch.tensor([[5, 9, 12], [7, 3 + 8, 16]])
POLICIES = {
    "full": kv.FullCache(),
    "streaming": kv.StreamingLLM(10, sinks=3),
    "streaming-per-head": kv.StreamingLLM(PER_HEAD, sinks=2),
    "streaming-fraction": kv.StreamingLLM(0.12, sinks=4),
    "h2o": kv.H2O(9),
    "h2o-no-recent": kv.H2O(6, recent=0.0),
    "h2o-per-head": kv.H2O(PER_HEAD, recent=0.3),
    "snapkv": kv.SnapKV(12, window=4, kernel=3),
    "snapkv-per-head": kv.SnapKV(PER_HEAD, window=3, kernel=5),
    "pyramidkv": kv.pyramid_kv(10, num_layers=2, beta=2, window=4, kernel=3),
    "duo": kv.DuoAttention(torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool), 2, 5),
}


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("ties", [False, True])
def test_keep_equals_reference(name: str, ties: bool) -> None:
    policy = POLICIES[name]
    for seed in range(3):
        view = make_view(seed, ties=ties)
        keep = policy.keep(view)
        assert torch.equal(keep, policy.reference(view)), f"{name} seed {seed}"
        assert not (keep & ~view.attendable).any(), "kept a non-attendable slot"


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv", "streaming-per-head"])
def test_budget_is_respected_and_filled(name: str) -> None:
    policy = POLICIES[name]
    view = make_view(1)
    budget = policy.budget.tokens(view.layer, HKV, view.context)
    kept = policy.keep(view).sum(-1)
    expected = torch.minimum(view.count(), budget.view(1, -1))
    assert torch.equal(kept, expected)


def test_streaming_keeps_sinks_and_recent_window() -> None:
    view = make_view(2)
    keep = kv.StreamingLLM(7, sinks=2).keep(view)
    for b in range(B):
        for h in range(HKV):
            slots = view.attendable[b, h].nonzero().flatten().tolist()
            want = slots if len(slots) <= 7 else slots[:2] + slots[-5:]
            assert keep[b, h].nonzero().flatten().tolist() == want


def test_h2o_keeps_heavy_hitters_and_recent() -> None:
    view = make_view(3)
    keep = kv.H2O(6, recent=0.5).keep(view)
    row = view.attendable[1, 2].nonzero().flatten().tolist()
    kept = keep[1, 2].nonzero().flatten().tolist()
    assert row[-3:] == kept[-3:]  # the 3 most recent
    heavy = sorted(row[:-3], key=lambda j: -float(view.scores[1, 2, j]))[:3]
    assert sorted(heavy) == [j for j in kept if j not in row[-3:]]


def test_snapkv_pools_votes_into_clusters_and_keeps_the_window() -> None:
    view = make_view(0)
    votes = torch.zeros(B, HKV, L)
    votes[:, :, 12] = 1.0  # one strong vote inside every row's prefix
    view = StepView(**{**view.__dict__, "key_sums": votes, "attendable": view.positions >= 0})
    keep = kv.SnapKV(7, window=4, kernel=3).keep(view)
    checked = 0
    for b in range(B):
        for h in range(HKV):
            if view.count()[b, h] > 7 and view.positions[b, h, 11] >= 0:
                kept = keep[b, h].nonzero().flatten().tolist()
                assert kept[-4:] == list(range(L - 4, L))
                assert {11, 12, 13} <= set(kept)  # the voted token and its pooled neighbours
                checked += 1
    assert checked
    not_first = StepView(**{**view.__dict__, "first_call": False})
    assert torch.equal(kv.SnapKV(7, window=4).keep(not_first), not_first.attendable)


@pytest.mark.parametrize(
    "policy",
    [
        kv.StreamingLLM(10**6),
        kv.H2O(10**6),
        kv.SnapKV(10**6),
        kv.StreamingLLM(1.0, sinks=4),
        kv.DuoAttention(torch.ones(2, HKV, dtype=torch.bool)),
    ],
    ids=lambda p: p.name,
)
def test_unlimited_budget_keeps_everything(policy) -> None:
    view = make_view(4)
    view = StepView(**{**view.__dict__, "context": view.seen})
    assert torch.equal(policy.keep(view), view.attendable)


def test_policy_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="below the 5 it always keeps"):
        kv.StreamingLLM(4, sinks=4)
    with pytest.raises(ValueError, match="below the 32 it always keeps"):
        kv.SnapKV(16, window=32)
    with pytest.raises(ValueError, match="odd width"):
        kv.SnapKV(64, kernel=4)
    with pytest.raises(ValueError, match="zero or negative budget"):
        kv.H2O(0)
    with pytest.raises(ValueError, match="recent must be a fraction"):
        kv.H2O(10, recent=2.0)
    with pytest.raises(ValueError, match="bool tensor"):
        kv.DuoAttention(torch.ones(2, 3))
    duo = kv.DuoAttention(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="model has 2 layers and 4 KV heads"):
        duo.check(2, 4)
    with pytest.raises(ValueError, match="below the 9 it always keeps"):
        kv.StreamingLLM(0.01, sinks=8).keep(make_view(0))  # a fraction that resolves too small


def test_pyramid_kv_gives_lower_layers_more_budget_around_the_window() -> None:
    policy = kv.pyramid_kv(100, num_layers=4, beta=10, window=20)
    budgets = [policy.budget.tokens(layer, 1, context=1000).item() for layer in range(4)]
    assert budgets[0] == 152 + 20 and budgets[-1] == 8 + 20
    assert budgets == sorted(budgets, reverse=True)
    with pytest.raises(ValueError, match="must exceed the 32 reserved"):
        kv.pyramid_kv(16, num_layers=4, window=32)
