"""Sigmoid, softplus-l1 and Cog weights and offset biases (ALiBi, KERPLE, T5, relative
tables) in the block-sparse kernel: every mask kind, float32 and bfloat16, MHA and GQA, forward
and every gradient (q, k, v and bias parameters) under the 2× rule against the float64
reference; and what the kernel does not run goes elsewhere, with the reason shown by
``explain``."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnkit
from attnkit import masks, positional, scores
from attnkit.backends import blocksparse, native
from attnkit.call import AttentionCall
from attnkit.testing import check_against_reference

run = partial(attnkit.attention, backend="blocksparse")

pytestmark = pytest.mark.skipif(
    native.load("blocksparse_cpu") is None, reason="the block-sparse kernel does not build here"
)

T = 144  # a 12 x 12 grid for the neighborhood


def segments(B: int) -> torch.Tensor:
    ids = torch.tensor([0] * 50 + [1] * 30 + [2] * 64)
    return ids.expand(B, T).contiguous()


MASKS = {
    "causal": lambda B: masks.causal(),
    "window": lambda B: masks.sliding_window(40),
    "documents": lambda B: masks.documents(segments(B)) & masks.causal(),
    "neighborhood_2d": lambda B: masks.neighborhood(5, (12, 12)),
}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def learned_alibi(H: int) -> positional.ALiBi:
    return positional.alibi(H, positional.alibi_slopes(H).clone().requires_grad_())


OPTIONS = {
    "sigmoid": lambda H: {"score": scores.sigmoid()},
    "sigmoid_softcap": lambda H: {"score": scores.sigmoid(bias=-2.0, softcap=4.0)},
    "alibi_learned": lambda H: {"bias": learned_alibi(H)},
    "sigmoid_alibi": lambda H: {"score": scores.sigmoid(), "bias": learned_alibi(H)},
    "softplus_l1": lambda H: {"score": scores.softplus_l1()},
    "cog": lambda H: {"score": scores.cog()},
    "cog_softcap_t5": lambda H: {
        "score": scores.cog(softcap=5.0),
        "bias": positional.t5_bias(H, generator=seeded(1)),
    },
    "kerple_power": lambda H: {"bias": positional.kerple(H, "power", generator=seeded(2))},
    "kerple_log_sigmoid": lambda H: {
        "bias": positional.kerple(H, "log", generator=seeded(3)),
        "score": scores.sigmoid(),
    },
    "t5": lambda H: {"bias": positional.t5_bias(H, generator=seeded(1))},
    "relative_table": lambda H: {"bias": positional.relative_bias(H, 16, generator=seeded(4))},
    "softplus_l1_softcap_alibi": lambda H: {
        "score": scores.softplus_l1(softcap=6.0),
        "bias": learned_alibi(H),
    },
}

HEADS = {"mha": (4, 4), "gqa_8_2": (8, 2)}


def qkv(Hq: int, Hkv: int, dtype: torch.dtype, B: int = 2, D: int = 16):
    g = torch.Generator().manual_seed(Hq * 7 + Hkv)
    q = torch.randn(B, T, Hq, D, generator=g)
    k, v = (torch.randn(B, T, Hkv, D, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("name", list(OPTIONS))
def test_the_kernel_matches_the_reference(
    name: str, mask: str, dtype: torch.dtype, heads: str
) -> None:
    Hq, Hkv = HEADS[heads]
    q, k, v = qkv(Hq, Hkv, dtype)
    options = OPTIONS[name](Hq) | {"mask": MASKS[mask](q.shape[0])}
    call = AttentionCall(q, k, v, **options)
    for part in call.passes():  # a signed score's two halves
        assert blocksparse.BACKEND.supports(part) is None and blocksparse.uses_kernel(part)
    check_against_reference(run, q, k, v, **options).assert_ok()


def test_sigmoid_runs_unshifted_and_a_bias_shifted() -> None:
    """Sigmoid weights are at most 1: no running max, even for large scores. With a bias a row's
    every score may lie far below others', so softmax takes the running max."""
    q, k, v = qkv(4, 4, torch.float32)
    large = q * 50
    assert not blocksparse.needs_shift(AttentionCall(large, k, v, score=scores.sigmoid()))
    assert blocksparse.needs_shift(AttentionCall(q, k, v, bias=positional.alibi(4)))
    check_against_reference(run, large, k, v, score=scores.sigmoid()).assert_ok()


def test_decoding_aligns_biases_bottom_right() -> None:
    """Fewer queries than keys: query i sits at position i + Tk - Tq, as in the reference."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 5, 4, 16, generator=g)
    k, v = (torch.randn(1, 300, 4, 16, generator=g) for _ in range(2))
    t5 = positional.t5_bias(4, generator=seeded(6))
    for score, bias in ((None, learned_alibi(4)), (scores.sigmoid(), t5)):
        check_against_reference(
            run, q, k, v, mask=masks.causal(), bias=bias, score=score
        ).assert_ok()


def test_a_query_that_sees_no_key_gets_zeros_with_sigmoid() -> None:
    q, k, v = qkv(4, 4, torch.float32, B=1)
    keep = torch.ones(1, T, dtype=torch.bool)
    keep[:, :10] = False
    mask = masks.keys(keep) & masks.causal()
    out = run(q, k, v, mask=mask, score=scores.sigmoid())
    assert torch.equal(out[:, :10], torch.zeros_like(out[:, :10]))
    check_against_reference(run, q, k, v, mask=mask, score=scores.sigmoid()).assert_ok()


def per_row_bias(score, b, h, q_idx, kv_idx):
    return score + 0.01 * q_idx  # a term of the query's position, not of the offset


def test_what_the_kernel_does_not_run_goes_elsewhere_and_explain_says_why() -> None:
    q, k, v = qkv(4, 4, torch.float32)
    for options, reason in (
        ({"score": scores.relu()}, "softmax, sigmoid, softplus-l1 and Cog only"),
        ({"bias": positional.from_score_mod(per_row_bias, 4)}, "query-key offset only"),
    ):
        explanation = attnkit.explain(q, k, v, mask=masks.causal(), **options)
        assert explanation.chosen != "blocksparse"
        assert reason in explanation.rejected["blocksparse"]


def test_the_batched_matmuls_refuse_other_weights_and_biases(monkeypatch) -> None:
    monkeypatch.setattr(blocksparse, "_kernel", lambda call: None)
    q, k, v = qkv(4, 4, torch.float32)
    for options in (
        {"score": scores.sigmoid()},
        {"score": scores.softplus_l1()},
        {"bias": positional.alibi(4)},
    ):
        reason = blocksparse.BACKEND.supports(AttentionCall(q, k, v, **options))
        assert reason is not None and "only in its compiled kernel" in reason
