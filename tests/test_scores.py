"""Score functions: each reference output equals its paper's formula written out in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks, positional, scores
from attnkit.scores import _log_softplus
from attnkit.testing import CASES


def inputs(case: str = "cross_17x65_b2"):
    return CASES[case].make(torch.float64, requires_grad=False)


def reference(q, k, v, **options):
    return attnkit.attention(q, k, v, backend="reference", **options)


def causal_allowed(Tq: int, Tk: int, window: int | None = None) -> torch.Tensor:
    """Bottom-right causal pattern written directly: query i sits at p = i + Tk - Tq and sees
    keys p - window <= j <= p."""
    position = torch.arange(Tq).view(-1, 1) + (Tk - Tq)
    j = torch.arange(Tk).view(1, -1)
    allowed = j <= position
    return allowed if window is None else allowed & (j >= position - window)


def test_softmax_is_the_default(formula) -> None:
    q, k, v = inputs()
    expected = formula(q, k, v, allowed=causal_allowed(17, 65))
    torch.testing.assert_close(reference(q, k, v, mask=masks.causal()), expected)


def test_sigmoid_default_bias_is_minus_log_keys() -> None:
    assert scores.sigmoid().resolved_bias(65) == pytest.approx(-math.log(65))
    assert scores.sigmoid(bias=-2.5).resolved_bias(65) == -2.5
    assert not scores.sigmoid().normalized


@pytest.mark.parametrize("bias", [None, -2.5], ids=["default_bias", "bias_-2.5"])
def test_sigmoid_output_is_unnormalised_sum(bias, formula) -> None:
    """Ramapuram et al. (2024): out_i = sum_j sigmoid(s_ij + b) v_j, b = -log(Tk) by default."""
    q, k, v = inputs()
    Tk = k.shape[1]
    b = -math.log(Tk) if bias is None else bias
    expected = formula(
        q,
        k,
        v,
        allowed=causal_allowed(17, Tk),
        weight=lambda s: torch.sigmoid(s + b),
        normalized=False,
    )
    got = reference(q, k, v, mask=masks.causal(), score=scores.sigmoid(bias=bias))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("length_scale", [True, False])
def test_softplus_l1_weights_use_log_row_count(length_scale: bool, formula) -> None:
    """Gao & Spratling (2025): w_ij = softplus(log(n_i) s_ij) / sum_j, n_i = keys query i sees."""
    q, k, v = inputs()
    Tq, Tk = q.shape[1], k.shape[1]
    allowed = causal_allowed(Tq, Tk, window=19)
    visible = allowed.sum(-1, keepdim=True).double()  # n_i, from the pattern itself
    factor = torch.log(visible) if length_scale else torch.ones_like(visible)
    expected = formula(q, k, v, allowed=allowed, weight=lambda s: F.softplus(factor * s))
    mask = masks.causal() & masks.sliding_window(19)
    got = reference(q, k, v, mask=mask, score=scores.softplus_l1(length_scale=length_scale))
    torch.testing.assert_close(got, expected)


def test_softplus_l1_without_mask_uses_log_tk(formula) -> None:
    q, k, v = inputs("gqa_8_2")
    log_tk = math.log(k.shape[1])
    expected = formula(q, k, v, weight=lambda s: F.softplus(log_tk * s))
    torch.testing.assert_close(reference(q, k, v, score=scores.softplus_l1()), expected)


@pytest.mark.parametrize("cap", [1.0, 5.0])
def test_softcap_is_cap_tanh_of_score(cap: float, formula) -> None:
    """Gemma 2 logit capping: softmax over cap * tanh(s / cap); the bias is added before."""
    q, k, v = inputs()
    scale = 1.0  # large scores, so capping changes the result
    bias = positional.alibi(4)
    expected = formula(
        q,
        k,
        v,
        scale=scale,
        bias=bias.dense(17, 65).double(),
        weight=lambda s: torch.exp(cap * torch.tanh(s / cap)),
    )
    got = reference(q, k, v, score=scores.softcap(cap), bias=bias, scale=scale)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, reference(q, k, v, bias=bias, scale=scale))


def test_sigmoid_with_softcap_caps_before_the_sigmoid_bias(formula) -> None:
    q, k, v = inputs()
    expected = formula(
        q,
        k,
        v,
        scale=1.0,
        weight=lambda s: torch.sigmoid(3.0 * torch.tanh(s / 3.0) - 1.0),
        normalized=False,
    )
    got = reference(q, k, v, score=scores.sigmoid(bias=-1.0, softcap=3.0), scale=1.0)
    torch.testing.assert_close(got, expected)


def test_cap_function() -> None:
    s = torch.linspace(-50, 50, 11, dtype=torch.float64)
    torch.testing.assert_close(scores.softcap(5.0).cap(s), 5.0 * torch.tanh(s / 5.0))
    assert torch.equal(scores.softmax().cap(s), s)


def test_softcap_must_be_positive() -> None:
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="softcap must be > 0"):
            scores.softcap(bad)


def test_log_softplus_matches_float64_and_stays_finite() -> None:
    x64 = torch.tensor([-700.0, -100.0, -30.0, -20.5, -20.0, -19.5, -5.0, 0.0, 3.0, 40.0])
    x64 = x64.double()
    exact = torch.log(torch.log1p(torch.exp(x64)))
    for dtype, tol in ((torch.float16, 1e-3), (torch.float32, 1e-6), (torch.float64, 1e-12)):
        got = _log_softplus(x64.to(dtype))
        torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)
    x = torch.tensor([-1e4, -1e3, -90.0, -88.0], requires_grad=True)
    y = _log_softplus(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.detach(), x.detach())  # log softplus(x) -> x as x -> -inf
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, torch.ones_like(grad))  # d/dx log softplus(x) -> 1


def test_softplus_l1_with_very_negative_scores_is_finite() -> None:
    q, k, v = CASES["gqa_8_2"].make(torch.float32)
    out = attnkit.attention(q, k, v, score=scores.softplus_l1(), scale=200.0, backend="reference")
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize(
    "score", [scores.softmax(), scores.sigmoid(), scores.softplus_l1(), scores.softcap(5.0)]
)
def test_fully_masked_rows_give_zero_for_every_score(score) -> None:
    q, k, v = inputs()
    mask = masks.key_padding(torch.tensor([65, 0]))
    out = reference(q, k, v, mask=mask, score=score)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


def test_describe_names_the_parameters() -> None:
    assert scores.softmax().describe() == "softmax"
    assert scores.softcap(5.0).describe() == "softmax(softcap=5)"
    assert scores.sigmoid().describe() == "sigmoid"
    assert scores.sigmoid(bias=-2.0, softcap=5.0).describe() == "sigmoid(bias=-2, softcap=5)"
    assert scores.softplus_l1().describe() == "softplus_l1"
    assert scores.softplus_l1(length_scale=False).describe() == "softplus_l1(length_scale=False)"
