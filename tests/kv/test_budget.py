"""Budgets: ints, fractions, per layer and per head; bad budgets fail with a clear error."""

from __future__ import annotations

import pytest
import torch

from attnkit.kv import Budget, pyramid


def test_int_and_fraction_budgets_resolve_per_head() -> None:
    assert Budget.of(7).tokens(0, 3, context=100).tolist() == [7, 7, 7]
    assert Budget.of(0.25).tokens(0, 2, context=101).tolist() == [26, 26]  # rounded up
    assert Budget.of(0.001).tokens(0, 1, context=10).tolist() == [1]  # at least one token


def test_per_layer_and_per_head_budgets() -> None:
    per_layer = Budget.of([10, 20])
    assert per_layer.tokens(1, 2, context=50).tolist() == [20, 20]
    per_head = Budget.of(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert per_head.tokens(1, 3, context=50).tolist() == [4, 5, 6]
    per_head.check(num_layers=2, num_kv_heads=3)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (0, "zero or negative budget"),
        (-3, "zero or negative budget"),
        (0.0, "zero or negative budget"),
        (1.5, "above 1"),
        (float("inf"), "not finite"),
        (True, "not a bool"),
        ([10, 0.5], "mixes ints and floats"),
        ([], "empty"),
        (torch.tensor([[1, 0]]), "zero or negative budget"),
        ("10", "budget must be"),
    ],
)
def test_bad_budgets_raise(spec: object, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        Budget.of(spec)


def test_mismatched_layers_or_heads_raise() -> None:
    with pytest.raises(ValueError, match="3 per-layer entries but the model has 2 layers"):
        Budget.of([1, 2, 3]).check(num_layers=2, num_kv_heads=4)
    with pytest.raises(ValueError, match="2 per-head entries but the model has 3 KV heads"):
        Budget.of(torch.ones(2, 2, dtype=torch.long)).tokens(0, 3, context=10)
    with pytest.raises(ValueError, match="no entry for layer 5"):
        Budget.of([1, 2]).tokens(5, 1, context=10)


def test_pyramid_budgets_shrink_upwards_with_the_given_average() -> None:
    budget = pyramid(100, num_layers=5, beta=10)
    values = [int(budget.tokens(layer, 2, context=1000)[0]) for layer in range(5)]
    assert values == sorted(values, reverse=True)
    assert values[-1] == 10 and values[0] == 190
    assert sum(values) / 5 == pytest.approx(100, abs=1)
    reserved = pyramid(0.2, num_layers=3, beta=4, reserved=10)  # fraction of a 500-token context
    values = [int(reserved.tokens(layer, 1, context=500)[0]) for layer in range(3)]
    assert values == [10 + 158, 10 + 90, 10 + 22]
    with pytest.raises(ValueError, match="beta"):
        pyramid(10, 4, beta=0.5)
    with pytest.raises(ValueError, match="built for 3 layers but the model has 4"):
        reserved.check(4, 1)
    with pytest.raises(ValueError, match="leaves nothing beyond the 10"):
        reserved.tokens(0, 1, context=20)
