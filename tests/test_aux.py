"""Aux outputs: lse, weights and per-key sums, checked against weights computed from scratch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import attnkit
from attnkit import Aux, masks, scores
from attnkit.backends import BACKENDS
from attnkit.call import AttentionCall
from attnkit.testing import CASES


def scaled_scores(q: Tensor, k: Tensor) -> Tensor:
    """``scale q.k`` ``[B, Hq, Tq, Tk]`` in float64, query head h reading k head h // G."""
    groups = q.shape[2] // k.shape[2]
    k = k.double().repeat_interleave(groups, dim=2)
    return torch.einsum("bihd,bjhd->bhij", q.double(), k) / math.sqrt(q.shape[-1])


def inputs(case: str):
    return CASES[case].make(torch.float64, requires_grad=False)


# Batch 1 sees no key at all: its rows are fully masked.
MASK = masks.causal() & masks.key_padding(torch.tensor([65, 0]))
ALL = Aux(lse=True, weights=True, key_sums=slice(-5, None))


def test_softmax_weights_lse_and_key_sums() -> None:
    q, k, v = inputs("cross_17x65_b2")
    out, aux = attnkit.attention(q, k, v, mask=MASK, aux=ALL, backend="reference")
    allowed = MASK.dense(17, 65)
    log_weights = scaled_scores(q, k).masked_fill(~allowed, float("-inf"))

    assert aux.weights.shape == (2, 4, 17, 65) and aux.lse.shape == (2, 17, 4)
    row_sums = aux.weights.sum(-1)
    torch.testing.assert_close(row_sums[0], torch.ones_like(row_sums[0]))
    assert torch.equal(aux.weights[1], torch.zeros_like(aux.weights[1]))
    assert not aux.weights.isnan().any()

    lse = torch.logsumexp(log_weights[0], dim=-1)  # [H, Tq]
    torch.testing.assert_close(aux.lse[0].transpose(0, 1), lse)
    assert torch.isneginf(aux.lse[1]).all()
    assert aux.weights.dtype == torch.float64
    expected = torch.exp(log_weights[0] - lse.unsqueeze(-1))
    torch.testing.assert_close(aux.weights[0], expected, rtol=1e-12, atol=1e-12)

    torch.testing.assert_close(aux.key_sums, aux.weights[:, :, -5:].sum(2).float())
    v_by_head = v.transpose(1, 2)
    torch.testing.assert_close(out, (aux.weights @ v_by_head).transpose(1, 2))


def test_weights_follow_the_gqa_head_mapping() -> None:
    q, k, v = inputs("gqa_8_2")
    _, aux = attnkit.attention(q, k, v, aux=Aux(weights=True), backend="reference")
    torch.testing.assert_close(aux.weights, torch.softmax(scaled_scores(q, k), dim=-1))
    assert aux.lse is None and aux.key_sums is None


def test_sigmoid_weights_are_unnormalised() -> None:
    q, k, v = inputs("mqa_b2")
    mask = masks.sliding_window(6)
    out, aux = attnkit.attention(
        q, k, v, mask=mask, score=scores.sigmoid(), aux=ALL, backend="reference"
    )
    allowed = mask.dense(33, 33)
    expected = torch.sigmoid(scaled_scores(q, k) - math.log(33)) * allowed
    torch.testing.assert_close(aux.weights, expected)
    assert (aux.weights.sum(-1) < 1).all(), "sigmoid weights are not row-normalised"
    v_by_head = v.transpose(1, 2).expand(-1, 4, -1, -1)  # MQA: one k/v head for all
    torch.testing.assert_close(out, (aux.weights @ v_by_head).transpose(1, 2))
    torch.testing.assert_close(aux.key_sums, expected[:, :, -5:].sum(2).float())


def test_softplus_weights_sum_to_one() -> None:
    q, k, v = inputs("cross_17x65_b2")
    _, aux = attnkit.attention(
        q, k, v, mask=MASK, score=scores.softplus_l1(), aux=ALL, backend="reference"
    )
    torch.testing.assert_close(aux.weights[0].sum(-1), torch.ones(4, 17, dtype=torch.float64))
    assert torch.equal(aux.weights[1], torch.zeros_like(aux.weights[1]))


@pytest.mark.parametrize(
    "selector",
    [
        torch.tensor([0, 3, -1, 16]),
        torch.arange(17) % 3 == 0,
        slice(None),
        slice(2, 9, 3),
        torch.tensor([], dtype=torch.long),
    ],
    ids=["index_tensor", "bool", "all", "strided_slice", "no_query"],
)
def test_key_sums_selectors(selector) -> None:
    q, k, v = inputs("cross_17x65_b2")
    _, aux = attnkit.attention(
        q, k, v, mask=masks.causal(), aux=Aux(weights=True, key_sums=selector), backend="reference"
    )
    rows = torch.arange(17)[selector]
    expected = aux.weights[:, :, rows].sum(2).float()
    assert aux.key_sums.shape == (2, 4, 65) and aux.key_sums.dtype == torch.float32
    torch.testing.assert_close(aux.key_sums, expected)


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        (torch.ones(16, dtype=torch.bool), r"boolean query selector must have shape \[17\]"),
        (torch.tensor([0, 17]), r"query indices must lie in \[-17, 17\)"),
        (torch.tensor([-18]), r"query indices must lie in \[-17, 17\)"),
    ],
    ids=["bool_wrong_length", "index_too_large", "index_too_small"],
)
def test_bad_key_sum_selectors_raise(selector, message: str) -> None:
    q, k, v = inputs("cross_17x65_b2")
    with pytest.raises(ValueError, match=message):
        attnkit.attention(q, k, v, aux=Aux(key_sums=selector), backend="reference")


def test_aux_must_be_an_aux_object() -> None:
    q, k, v = inputs("cross_17x65_b2")
    with pytest.raises(TypeError, match=r"aux must be attnkit.Aux\(...\), got dict"):
        attnkit.attention(q, k, v, aux={"lse": True})


@pytest.mark.parametrize("score", [scores.softmax(), scores.sigmoid()], ids=lambda s: s.name)
@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "reference"])
def test_every_backend_that_accepts_aux_matches_the_reference(
    name: str, score, backend_context
) -> None:
    q, k, v = CASES["gqa_8_2"].make(torch.float32, requires_grad=False)
    mask = masks.sinks(2) | masks.sliding_window(9)
    with backend_context(name):
        reason = BACKENDS[name].supports(AttentionCall(q, k, v, mask, score, aux=ALL))
        if reason is not None:
            assert reason.strip(), "a refusal must say why"
            with pytest.raises(ValueError, match="cannot run this call"):
                attnkit.attention(q, k, v, mask=mask, score=score, aux=ALL, backend=name)
            return
        out, aux = attnkit.attention(q, k, v, mask=mask, score=score, aux=ALL, backend=name)
    ref_out, ref = attnkit.attention(q, k, v, mask=mask, score=score, aux=ALL, backend="reference")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.lse, ref.lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.weights, ref.weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.key_sums, ref.key_sums, atol=1e-5, rtol=1e-5)
