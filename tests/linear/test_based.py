"""BASED (Arora et al., 2024): Taylor linear attention + sliding-window softmax."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import check_forms, draw, qkv, split_run

import attnkit
from attnkit import masks
from attnkit.linear import BasedState, LinearState, based, taylor_feature_map
from attnkit.linear.chunked import LinearProblem, solve


def inputs(dtype=torch.float32, T=45, Df=4):
    x = qkv(T=T, dtype=dtype)
    B, _, Hq, _ = x["q"].shape
    return x | {
        "feature_q": draw(B, T, Hq, Df, dtype=dtype, seed=5),
        "feature_k": draw(B, T, 2, Df, dtype=dtype, seed=6),
    }


def test_taylor_map_is_the_second_order_expansion_of_exp() -> None:
    q, k = draw(7, 5, dtype=torch.float64), draw(7, 5, dtype=torch.float64, seed=2)
    s = (q * k).sum(-1) / 5**0.5
    dot = (taylor_feature_map(q) * taylor_feature_map(k)).sum(-1)
    torch.testing.assert_close(dot, 1 + s + s**2 / 2)
    assert taylor_feature_map(q).shape == (7, 1 + 5 + 25)


def test_is_the_sum_of_its_two_halves() -> None:
    x = inputs(dtype=torch.float64)
    window = attnkit.attention(x["q"], x["k"], x["v"], mask=masks.sliding_window(9))
    phi_q, phi_k = taylor_feature_map(x["feature_q"]), taylor_feature_map(x["feature_k"])
    linear = solve(LinearProblem(phi_q, phi_k, x["v"], normalize=True), form="reference")
    torch.testing.assert_close(based(**x, window=10), linear + window)


@pytest.mark.parametrize("window", [1, 8])
def test_forms_agree(window: int) -> None:
    check_forms(lambda **y: based(**y, window=window), inputs(), chunk_sizes=(7, 64))


def test_state_passing_carries_the_window() -> None:
    x = inputs(dtype=torch.float64, T=40)
    split_run(lambda **y: based(**y, window=6), x, cut=13, chunk_size=8)
    _, state = based(**{n: t[:, :3] for n, t in x.items()}, window=6, return_state=True)
    assert isinstance(state, BasedState) and state.keys.shape[1] == 3
    _, state = based(**x, window=6, return_state=True)
    assert state.keys.shape[1] == 5 and isinstance(state.linear, LinearState)


def test_bfloat16_forward() -> None:
    check_forms(
        lambda **y: based(**y, window=8), inputs(torch.bfloat16), chunk_sizes=(16,), grads=False
    )


def test_errors() -> None:
    x = inputs()
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        based(**x, window=0)
    _, state = based(**x, window=8, return_state=True)
    with pytest.raises(ValueError, match="holds 7 window keys, more than window - 1 = 3"):
        based(**x, window=4, initial_state=state)
    with pytest.raises(ValueError, match=r"feature_q .* must match q"):
        based(**(x | {"feature_q": x["feature_q"][:, :, :2]}))
