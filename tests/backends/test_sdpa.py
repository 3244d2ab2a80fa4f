"""The SDPA backend: dense masks with bottom-right alignment, biases as float masks, refusals."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnkit
from attnkit import Aux, masks, positional, scores
from attnkit.backends import BACKENDS
from attnkit.backends.sdpa import dense_attn_mask
from attnkit.call import AttentionCall
from attnkit.testing import CASES, check_against_reference, reference_attention

sdpa = partial(attnkit.attention, backend="sdpa")
SDPA = BACKENDS["sdpa"]


def test_only_square_causal_uses_is_causal() -> None:
    q, k, v = CASES["cross_17x65_b2"].make(requires_grad=False)
    square = AttentionCall(q, q, q, masks.causal())
    assert dense_attn_mask(square) is None, "square causal runs as is_causal"
    cross = AttentionCall(q, k, v, masks.causal())
    assert dense_attn_mask(cross) is not None, "SDPA is top-left"
    for mask in (masks.sliding_window(3), masks.causal() & masks.sinks(2)):
        assert dense_attn_mask(AttentionCall(q, q, q, mask)) is not None, mask


@pytest.mark.parametrize(
    ("case", "mask", "bias"),
    [
        ("self_odd_63", masks.causal(), None),
        ("cross_17x65_b2", masks.causal(), None),
        ("self_odd_63", masks.causal(), positional.alibi(4)),
        ("cross_17x65_b2", masks.causal(), positional.alibi(4)),
        ("gqa_8_2", masks.sliding_window(5, 2), None),
        ("mqa_b2", masks.key_padding(torch.tensor([33, 5]), side="left"), None),
        ("value_dim_48", masks.sinks(2) | masks.sliding_window(4), positional.alibi(2)),
        ("decode_1x70", masks.causal(), None),
        ("odd_head_dim_33", None, positional.alibi(2)),
        ("mqa_b2", masks.prefix_lm(torch.tensor([3, 20])), "relative"),
    ],
    ids=[
        "causal_square",
        "causal_bottom_right",
        "causal_square_alibi",
        "causal_cross_alibi",
        "gqa_window",
        "mqa_left_padding",
        "dv48_sinks_window_alibi",
        "decode",
        "alibi_no_mask",
        "prefix_lm_relative",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_matches_the_reference(case: str, mask, bias, dtype: torch.dtype) -> None:
    q, k, v = CASES[case].make(dtype)
    if bias == "relative":
        bias = positional.relative_bias(4, 6, generator=torch.Generator().manual_seed(0))
    assert SDPA.supports(AttentionCall(q, k, v, mask, bias=bias)) is None
    check_against_reference(sdpa, q, k, v, mask=mask, bias=bias).assert_ok()


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"score": scores.sigmoid()}, "sdpa computes only softmax attention"),
        ({"score": scores.softplus_l1()}, "this call uses softplus_l1"),
        ({"score": scores.softcap(5.0)}, "sdpa has no logit soft-capping"),
        ({"aux": Aux(lse=True)}, "does not return the log-sum-exp"),
        ({"aux": Aux(key_sums=slice(None))}, "does not return the log-sum-exp"),
    ],
    ids=["sigmoid", "softplus", "softcap", "lse", "key_sums"],
)
def test_sdpa_refuses_with_a_reason(options: dict, reason: str) -> None:
    q, k, v = CASES["gqa_8_2"].make(requires_grad=False)
    call = AttentionCall(q, k, v, **options)
    assert reason in SDPA.supports(call)
    with pytest.raises(ValueError, match=reason):
        sdpa(q, k, v, **options)


def test_dense_mask_is_cached_and_bias_becomes_a_float_mask() -> None:
    q, k, v = CASES["cross_17x65_b2"].make(requires_grad=False)
    mask = masks.sliding_window(4)
    first = dense_attn_mask(AttentionCall(q, k, v, mask))
    assert first.dtype == torch.bool and first is dense_attn_mask(AttentionCall(q, k, v, mask))
    assert torch.equal(first, mask.dense(17, 65))
    bias = positional.alibi(4)
    float_mask = dense_attn_mask(AttentionCall(q, k, v, mask, bias=bias))
    assert float_mask.shape == (1, 4, 17, 65) and float_mask.dtype == torch.float32
    allowed = mask.dense(17, 65)
    assert torch.isneginf(float_mask[~allowed.expand_as(float_mask)]).all()
    torch.testing.assert_close(
        float_mask[allowed.expand_as(float_mask)],
        bias.dense(17, 65).unsqueeze(0)[allowed.expand_as(float_mask)],
    )
    assert dense_attn_mask(AttentionCall(q, q, q, masks.causal())) is None  # is_causal instead


def test_fixed_bias_float_mask_is_built_once_and_never_reused_for_another_bias() -> None:
    q, k, v = CASES["self_odd_63"].make(torch.float32, requires_grad=False)
    mask = masks.sliding_window(9)
    first = positional.alibi(q.shape[2])
    out_first = attnkit.attention(q, k, v, mask=mask, bias=first, backend="sdpa")
    call = AttentionCall(q, k, v, mask, bias=first)
    assert dense_attn_mask(call) is dense_attn_mask(call)
    other = positional.alibi(q.shape[2], slopes=torch.linspace(1.0, 2.0, q.shape[2]))
    out_other = attnkit.attention(q, k, v, mask=mask, bias=other, backend="sdpa")
    expected = reference_attention(q, k, v, mask=mask, bias=other)
    torch.testing.assert_close(out_other, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_first, out_other)


def test_learned_bias_is_rebuilt_every_call_so_its_gradient_flows() -> None:
    q, k, v = CASES["self_odd_63"].make(torch.float32, requires_grad=False)
    bias = positional.relative_bias(q.shape[2], 4)
    call = AttentionCall(q, k, v, masks.causal(), bias=bias)
    assert dense_attn_mask(call) is not dense_attn_mask(call)
    attnkit.attention(q, k, v, mask=masks.causal(), bias=bias, backend="sdpa").sum().backward()
    assert bias.table.grad is not None and bias.table.grad.abs().sum() > 0
