"""ACT (Yu et al., ICML 2024): the fast calibrated attention against the dense reference."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import attnkit
from attnkit import masks, scores
from attnkit.testing import CASES, Case, check_function
from attnkit.variants import (
    ACTConfig,
    calibrate_weights,
    calibrated_attention,
    detect_sinks,
    find_sinks,
    reference_calibrated_attention,
    visible_query_counts,
)

SINK = 5  # a key every query attends to strongly (see with_sink)


def with_sink(case: Case, dtype=torch.float32, requires_grad: bool = True):
    """q, k, v with key ``SINK`` aligned with the mean query, so it is a clear sink."""
    q, k, v = case.make(dtype, requires_grad=False)
    k = k.clone()
    direction = q.double().mean((1, 2))[:, None, :]  # [B, 1, D]
    k[:, SINK] = (12 * direction / direction.norm(dim=-1, keepdim=True)).to(dtype)
    return (
        q.requires_grad_(requires_grad),
        k.requires_grad_(requires_grad),
        v.requires_grad_(requires_grad),
    )


def document_mask(case: Case) -> masks.Mask:
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([9, 14, case.Tk]))[: case.Tk]
    return masks.documents(
        ids[case.Tk - case.Tq :].expand(case.B, -1), kv_segment_ids=ids.expand(case.B, -1)
    )


MASKS = {
    "none": lambda c: None,
    "causal": lambda c: masks.causal(),
    "sinks_window": lambda c: masks.causal() & (masks.sinks(2) | masks.sliding_window(9)),
    "documents": document_mask,
    "padding_left": lambda c: masks.key_padding(torch.tensor([c.Tk - 4, c.Tk // 2][: c.B]), "left"),
}


def test_calibrate_weights_by_hand() -> None:
    """Sink key 1 keeps beta of its weight; the rest goes to the others in proportion."""
    w = torch.tensor([[[[0.1, 0.6, 0.1, 0.2], [0.0, 1.0, 0.0, 0.0]]]], dtype=torch.float64)
    sinks = torch.tensor([[[False, True, False, False]]])
    got = calibrate_weights(w, sinks, beta=0.5)
    moved = 0.5 * 0.6  # spread over 0.1 : 0.1 : 0.2
    expected_row = [0.1 + moved * 0.25, 0.3, 0.1 + moved * 0.25, 0.2 + moved * 0.5]
    torch.testing.assert_close(got[0, 0, 0], torch.tensor(expected_row, dtype=torch.float64))
    torch.testing.assert_close(got[0, 0, 1], w[0, 0, 1])  # only a sink visible: unchanged
    torch.testing.assert_close(got.sum(-1), w.sum(-1))


def test_find_sinks_uses_the_mean_over_visible_queries_and_keeps_the_first() -> None:
    key_sums = torch.tensor([[[5.0, 0.5, 0.9, 0.05]]])
    counts = torch.tensor([4, 4, 3, 0])  # key 3: seen by nobody
    got = find_sinks(key_sums, counts, threshold=0.2)
    assert got.tolist() == [[[False, False, True, False]]]
    got = find_sinks(key_sums, counts, threshold=0.2, keep_first=False)
    assert got.tolist() == [[[True, False, True, False]]]


@pytest.mark.parametrize("mask", ["causal", "sinks_window", "documents", "padding_left"])
def test_visible_query_counts_match_the_dense_mask(mask: str) -> None:
    case = CASES["cross_17x65_b2"]
    m = MASKS[mask](case)
    got = visible_query_counts(m, case.Tq, case.Tk)
    torch.testing.assert_close(got, m.dense(case.Tq, case.Tk).sum(-2))
    assert torch.equal(visible_query_counts(None, 3, 5), torch.full((1, 1, 5), 3))


def test_detect_sinks_finds_the_planted_sink_from_key_sums() -> None:
    case = CASES["gqa_8_2"]
    q, k, v = with_sink(case, torch.float64, requires_grad=False)
    found = detect_sinks(q, k, v, mask=masks.causal(), backend="chunked")
    assert found[:, :, SINK].all() and not found[:, :, 0].any()
    weights = attnkit.attention(
        q, k, v, mask=masks.causal(), backend="reference", aux=attnkit.Aux(weights=True)
    )[1].weights
    counts = torch.arange(case.Tk, 0, -1)  # causal: key j is seen by T - j queries
    assert torch.equal(found, find_sinks(weights.sum(-2), counts))


@pytest.mark.parametrize(
    ("case", "mask", "sinks", "dtype"),
    [
        ("gqa_8_2", "causal", None, torch.float32),
        ("gqa_8_2", "sinks_window", None, torch.float32),
        ("cross_17x65_b2", "documents", None, torch.float32),
        ("mqa_b2", "padding_left", [0, SINK, 9], torch.float32),
        ("decode_1x70", "none", [SINK, 30], torch.float32),
        ("self_odd_63", "causal", [1, SINK], torch.float32),
        ("gqa_8_2", "causal", None, torch.bfloat16),
    ],
)
def test_fast_matches_reference_forward_and_backward(case, mask, sinks, dtype) -> None:
    c = CASES[case]
    q, k, v = with_sink(c, dtype)
    config = ACTConfig(heads=tuple(range(0, c.Hq, 2)), beta=0.4)
    options = {"mask": MASKS[mask](c), "sinks": sinks}

    def fast(q, k, v):
        return calibrated_attention(q, k, v, config, backend="chunked", **options)

    def reference(q, k, v):
        return reference_calibrated_attention(q, k, v, config, **options)

    check_function(fast, reference, {"q": q, "k": k, "v": v}).assert_ok()


def test_the_one_sink_identity_of_the_docstring() -> None:
    """o' = (1 - beta p) / (1 - p) (o - p v_s) + beta p v_s with p = exp(s_is - lse_i)."""
    case = CASES["cross_17x65_b2"]
    q, k, v = with_sink(case, torch.float64, requires_grad=False)
    beta = 0.3
    o, aux = attnkit.attention(q, k, v, mask=masks.causal(), aux=attnkit.Aux(lse=True))
    s = torch.einsum("bihd,bjhd->bihj", q, k) / math.sqrt(32)
    p = torch.exp(s[..., SINK] - aux.lse).unsqueeze(-1)  # [B, Tq, H, 1]
    v_s = v[:, SINK].unsqueeze(1)
    expected = (1 - beta * p) / (1 - p) * (o - p * v_s) + beta * p * v_s
    config = ACTConfig(heads=(0, 1, 2, 3), beta=beta)
    got = calibrated_attention(q, k, v, config, mask=masks.causal(), sinks=[SINK])
    torch.testing.assert_close(got, expected)


def test_beta_one_and_other_heads_are_plain_attention() -> None:
    case = CASES["gqa_8_2"]
    q, k, v = with_sink(case, torch.float64, requires_grad=False)
    plain = attnkit.attention(q, k, v, mask=masks.causal())
    for fn in (calibrated_attention, reference_calibrated_attention):
        got = fn(q, k, v, ACTConfig(heads=(1, 2), beta=1.0), mask=masks.causal())
        torch.testing.assert_close(got, plain)
        got = fn(q, k, v, ACTConfig(heads=(1, 2), beta=0.2), mask=masks.causal())
        others = [0, 3, 4, 5, 6, 7]
        torch.testing.assert_close(got[:, :, others], plain[:, :, others])
        assert not torch.allclose(got[:, :, [1, 2]], plain[:, :, [1, 2]])


def test_rows_that_see_only_sinks_are_unchanged() -> None:
    """Under a causal mask query 0 sees only key 0: with key 0 a sink it keeps v_0."""
    q, k, v = CASES["self_odd_63"].make(torch.float64, requires_grad=False)
    config = ACTConfig(heads=(0, 1, 2, 3), beta=0.1)
    for fn in (calibrated_attention, reference_calibrated_attention):
        got = fn(q, k, v, config, mask=masks.causal(), sinks=[0, 1])
        torch.testing.assert_close(got[:, 0], v[:, 0])
        assert torch.isfinite(got).all()


def test_sinks_may_differ_per_batch_and_head() -> None:
    case = CASES["mqa_b2"]
    q, k, v = with_sink(case, torch.float64, requires_grad=False)
    sinks = torch.zeros(2, 4, 33, dtype=torch.bool)
    sinks[0, 1, [3, SINK]] = True
    sinks[1, 2, 7] = True
    config = ACTConfig(heads=(1, 2))
    got = calibrated_attention(q, k, v, config, mask=masks.causal(), sinks=sinks)
    expected = reference_calibrated_attention(q, k, v, config, mask=masks.causal(), sinks=sinks)
    torch.testing.assert_close(got, expected)


def test_other_normalised_scores_work() -> None:
    q, k, v = with_sink(CASES["gqa_8_2"], torch.float64, requires_grad=False)
    config = ACTConfig(heads=(0, 5))
    for score in (scores.softcap(3.0), scores.softplus_l1(length_scale=False)):
        options = {"mask": masks.causal(), "score": score, "sinks": [SINK]}
        got = calibrated_attention(q, k, v, config, **options)
        torch.testing.assert_close(got, reference_calibrated_attention(q, k, v, config, **options))


def test_bad_arguments_raise() -> None:
    q, k, v = CASES["mqa_b2"].make(torch.float32, requires_grad=False)
    config = ACTConfig(heads=(0,))
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
        ACTConfig(heads=(0,), beta=1.5)
    with pytest.raises(ValueError, match="threshold must lie in"):
        ACTConfig(heads=(0,), threshold=0.0)
    with pytest.raises(ValueError, match="non-empty tuple"):
        ACTConfig(heads=())
    with pytest.raises(TypeError, match=r"e\.g\. \(3,\)"):
        ACTConfig(heads=3)
    fast = partial(calibrated_attention, q, k, v)
    with pytest.raises(ValueError, match="name a head >= 4"):
        fast(ACTConfig(heads=(4,)))
    with pytest.raises(ValueError, match=r"must lie in \[0, 33\)"):
        fast(config, sinks=[40])
    with pytest.raises(ValueError, match="do not broadcast"):
        fast(config, sinks=torch.zeros(3, 33, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor broadcastable"):
        fast(config, sinks=torch.tensor([0.5]))
    for score in (scores.sigmoid(), scores.cog()):
        with pytest.raises(ValueError, match="rows that sum to 1"):
            fast(config, score=score)
    with pytest.raises(ValueError, match="split into sink and non-sink keys would change"):
        fast(config, score=scores.softplus_l1())
