"""Score functions: each reference output equals its paper's formula written out in float64."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import attnkit
import attnkit.testing
from attnkit import masks, positional, scores
from attnkit.backends import BACKENDS
from attnkit.call import AttentionCall
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
    "score",
    [scores.softmax(), scores.sigmoid(), scores.softplus_l1(), scores.softcap(5.0), scores.relu()],
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


# -- ReLU attention (Wortsman et al., 2023) ------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_relu_output_is_relu_over_the_number_of_keys(causal: bool, formula) -> None:
    """Wortsman et al. (2023): out_i = sum_j relu(s_ij) / L v_j, L = Tk, not normalised."""
    q, k, v = inputs()
    Tq, Tk = q.shape[1], k.shape[1]
    expected = formula(
        q,
        k,
        v,
        allowed=causal_allowed(Tq, Tk) if causal else None,
        weight=lambda s: torch.relu(s) / Tk,
        normalized=False,
    )
    mask = masks.causal() if causal else None
    torch.testing.assert_close(reference(q, k, v, mask=mask, score=scores.relu()), expected)
    assert not scores.relu().normalized


@pytest.mark.parametrize(
    ("case", "mask", "dtype"),
    [
        ("cross_17x65_b2", None, torch.float32),
        ("gqa_8_2", masks.causal(), torch.float32),
        ("value_dim_48", masks.sinks(3) | masks.sliding_window(6), torch.float32),
        ("decode_1x70", masks.causal(), torch.bfloat16),
        ("gqa_8_2", None, torch.bfloat16),
    ],
)
def test_relu_forward_and_backward_under_the_2x_rule(case, mask, dtype, backend_context) -> None:
    """Every backend that accepts the call: forward and backward (forward only where the
    backend refuses gradients, as Flex does on the CPU); the others say why.

    bfloat16 checks the forward only: relu's derivative jumps from 0 to 1/L at s = 0, so a
    score within bfloat16's rounding of 0 lands on either side depending on how an
    implementation rounds (the chunked backend scales q before its matmul, the reference
    after), and that pair's gradient differs by a whole jump, not by a rounding error."""
    q, k, v = CASES[case].make(dtype)
    options = {"mask": mask, "score": scores.relu()}
    check = partial(attnkit.testing.check_against_reference, q=q, k=k, v=v, **options)
    grads = dtype != torch.bfloat16
    for name, backend in BACKENDS.items():
        fn = partial(attnkit.attention, backend=name)
        with backend_context(name):
            if backend.supports(AttentionCall(q, k, v, **options)) is None:
                check(fn, grads=grads).assert_ok()
                continue
            with torch.no_grad():
                reason = backend.supports(AttentionCall(q, k, v, **options))
            if reason is None:
                check(fn, grads=False).assert_ok()
            else:
                assert "relu" in reason or "softmax" in reason, reason


def test_relu_query_with_no_positive_score_gives_zero_and_finite_gradients() -> None:
    """A zero query scores 0 on every key: every weight is relu(0) = 0."""
    _, k, v = CASES["cross_17x65_b2"].make(torch.float32)
    q = torch.zeros(2, 17, 4, 32, requires_grad=True)
    for backend in ("reference", "chunked"):
        out = attnkit.attention(q, k, v, score=scores.relu(), backend=backend)
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_relu_describe() -> None:
    assert scores.relu().describe() == "relu"
    assert scores.relu(softcap=5.0).describe() == "relu(softcap=5)"


# -- Cog attention (signed weights) -------------------------------------------------------


def cog_formula(q, k, v, allowed=None):
    """Lv et al. (2024/2025), written out in float64: w_ij = sign(s_ij) e^|s_ij| / sum_k e^|s_ik|
    over the keys query i sees (0 for a query that sees none)."""
    q, k, v = q.detach().double(), k.detach().double(), v.detach().double()
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    magnitude = torch.exp(s.abs())
    if allowed is not None:
        magnitude = magnitude * allowed
    z = magnitude.sum(-1, keepdim=True)
    w = torch.where(z > 0, torch.sign(s) * magnitude / torch.where(z > 0, z, 1.0), 0.0)
    return torch.einsum("bhij,bjhd->bihd", w, v)


def cog_masks(case) -> dict[str, masks.Mask | None]:
    """One of each mask family, with a fully masked batch row in ``empty_row``."""
    B, Tq, Tk = case.B, case.Tq, case.Tk
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([5, 9, 2, Tk]))[:Tk]
    lengths = torch.tensor([Tk - 3, Tk // 3, Tk, 1][:B])
    return {
        "none": None,
        "causal": masks.causal(),
        "window_5_3": masks.sliding_window(5, 3),
        "sinks_window": masks.causal() & (masks.sinks(3) | masks.sliding_window(6)),
        "prefix_lm": masks.prefix_lm(torch.tensor([5, Tk // 2, 3, 1][:B])),
        "documents": masks.documents(
            ids[Tk - Tq :].expand(B, -1), kv_segment_ids=ids.expand(B, -1)
        ),
        "padding_left": masks.key_padding(lengths, side="left"),
        "empty_row": masks.causal() & masks.key_padding(torch.tensor([Tk // 2, 0, 3, 4][:B])),
    }


def test_cog_reference_is_the_signexp_formula() -> None:
    q, k, v = inputs("gqa_8_2")
    expected = cog_formula(q, k, v, allowed=causal_allowed(48, 48))
    oracle = attnkit.testing.reference_attention(q, k, v, mask=masks.causal(), score=scores.cog())
    torch.testing.assert_close(oracle, expected)
    # attention() runs the signed score as two merged positive passes, on every backend
    got = reference(q, k, v, mask=masks.causal(), score=scores.cog())
    torch.testing.assert_close(got, expected)


def test_cog_with_bias_and_softcap_signs_the_capped_score() -> None:
    q, k, v = inputs()
    bias = positional.alibi(4)
    cap = 2.0
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(32) + bias.dense(17, 65).double()
    capped = cap * torch.tanh(s / cap)
    w = torch.sign(capped) * torch.exp(capped.abs())
    expected = torch.einsum("bhij,bjhd->bihd", w / w.abs().sum(-1, keepdim=True), v)
    for backend in ("reference", "chunked"):
        got = attnkit.attention(q, k, v, score=scores.cog(softcap=cap), bias=bias, backend=backend)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "case", ["self_odd_63", "cross_17x65_b2", "gqa_8_2", "mqa_b2", "decode_1x70"]
)
def test_cog_chunked_matches_the_formula_for_every_mask(case: str) -> None:
    q, k, v = inputs(case)
    c = CASES[case]
    for name, mask in cog_masks(c).items():
        allowed = None if mask is None else mask.dense(c.Tq, c.Tk)
        expected = cog_formula(q, k, v, allowed=allowed)
        got = attnkit.attention(q, k, v, mask=mask, score=scores.cog(), backend="chunked")
        torch.testing.assert_close(got, expected, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("case", "mask", "dtype"),
    [
        ("gqa_8_2", "causal", torch.float32),
        ("cross_17x65_b2", "documents", torch.float32),
        ("mqa_b2", "empty_row", torch.float32),
        ("value_dim_48", "sinks_window", torch.float32),
        ("gqa_8_2", "prefix_lm", torch.bfloat16),
        ("cross_17x65_b2", "padding_left", torch.bfloat16),
    ],
)
def test_cog_forward_and_backward_under_the_2x_rule(case: str, mask: str, dtype) -> None:
    q, k, v = CASES[case].make(dtype)
    options = {"mask": cog_masks(CASES[case])[mask], "score": scores.cog()}
    for backend in ("chunked", "reference"):
        fn = partial(attnkit.attention, backend=backend)
        attnkit.testing.check_against_reference(fn, q, k, v, **options).assert_ok()


def test_cog_fully_masked_rows_give_zero_and_zero_gradients() -> None:
    q, k, v = CASES["cross_17x65_b2"].make(torch.float32)
    mask = masks.key_padding(torch.tensor([65, 0]))
    out = attnkit.attention(q, k, v, mask=mask, score=scores.cog(), backend="chunked")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def test_cog_zero_scores_weigh_nothing_but_count_in_the_normaliser() -> None:
    """sign(0) = 0: a zero query gives out = 0 and lse = log(Tk) (each key adds e^0 = 1)."""
    _, k, v = inputs()
    q = torch.zeros(2, 17, 4, 32, dtype=torch.float64)
    for backend in ("reference", "chunked"):
        out, aux = attnkit.attention(
            q, k, v, score=scores.cog(), backend=backend, aux=attnkit.Aux(lse=True)
        )
        assert torch.equal(out, torch.zeros_like(out))
        torch.testing.assert_close(aux.lse, torch.full_like(aux.lse, math.log(65)))


def test_cog_lse_is_the_log_of_the_magnitude_sum() -> None:
    q, k, v = inputs("gqa_8_2")
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(4, 2)) / math.sqrt(32)
    expected = torch.logsumexp(s.abs(), dim=-1).transpose(1, 2)  # [B, Tq, Hq]
    _, aux = attnkit.attention(
        q, k, v, score=scores.cog(), backend="chunked", aux=attnkit.Aux(lse=True)
    )
    torch.testing.assert_close(aux.lse, expected)


def test_cog_can_give_negative_weights_softmax_cannot() -> None:
    """With v = 1 every softmax output is 1; Cog's is sum_j w_ij, which lies in [-1, 1]."""
    q, k, _ = inputs()
    v = torch.ones(2, 65, 4, 1, dtype=torch.float64)
    out = reference(q, k, v, score=scores.cog())
    assert (out < 0).any() and (out > 0).any() and (out.abs() <= 1).all()


def test_fast_backends_that_cannot_run_cog_say_why() -> None:
    q, k, v = CASES["gqa_8_2"].make(torch.float32, requires_grad=False)
    for backend, phrase in (("sdpa", "only softmax"), ("flex", "log-sum-exp")):
        with pytest.raises(ValueError, match=phrase) as error:
            attnkit.attention(q, k, v, score=scores.cog(), backend=backend)
        assert "two positive-weight passes" in str(error.value)
    assert attnkit.explain(q, k, v, score=scores.cog()).chosen not in ("sdpa", "flex")
    # asked directly (as the catalog and the backend matrix do), backends agree
    call = AttentionCall(q, k, v, score=scores.cog())
    able = [name for name, backend in BACKENDS.items() if backend.supports(call) is None]
    assert set(able) >= {"reference", "chunked"} and not {"sdpa", "flex"} & set(able)


def test_cog_aux_weights_keep_their_sign_and_reproduce_the_output() -> None:
    q, k, v = inputs()
    out, extra = attnkit.attention(
        q,
        k,
        v,
        mask=masks.causal(),
        score=scores.cog(),
        aux=attnkit.Aux(weights=True, key_sums=slice(-3, None)),
    )
    w = extra.weights  # [B, Hq, Tq, Tk], signed
    assert (w < 0).any() and (w > 0).any()
    groups = q.shape[2] // v.shape[2]
    expected = torch.einsum("bhqk,bkhd->bqhd", w, v.repeat_interleave(groups, dim=2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(extra.key_sums, w[:, :, -3:].sum(2).float(), atol=1e-5, rtol=1e-5)


def test_cog_part_sign_must_be_one_or_minus_one() -> None:
    with pytest.raises(ValueError, match="sign must be 1 or -1"):
        scores.CogPart(sign=0)


def test_cog_describe() -> None:
    assert scores.cog().describe() == "cog"
    assert scores.cog(softcap=5.0).describe() == "cog(softcap=5)"
    positive, negative = scores.cog(softcap=5.0).halves()
    assert positive.describe() == "cog(positive part, softcap=5)"
    assert negative.describe() == "cog(negative part, softcap=5)"
