"""The dense path of the head-mixing layouts: with identity compositions it is
``attnkit.attention`` for every mask, score function and bias; head-specific masks stay applied
after the weights are mixed."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks, positional, scores
from attnkit.attend import Attend
from attnkit.heads.dense import dense_attend
from attnkit.heads.talking import mix_heads
from attnkit.testing import CASES

OPTIONS = {
    "causal": dict(mask=masks.causal()),
    "window_sinks_sigmoid": dict(
        mask=masks.causal() & masks.sliding_window(7) | masks.sinks(2), score=scores.sigmoid()
    ),
    "alibi_softcap": dict(mask=masks.causal(), bias=positional.alibi(8), score=scores.softcap(5.0)),
    "softplus_l1": dict(mask=masks.causal(), score=scores.softplus_l1()),
    "cog_scale": dict(score=scores.cog(), scale=0.2),
}


@pytest.mark.parametrize("label", sorted(OPTIONS))
def test_identity_compositions_equal_attention(label):
    q, k, v = CASES["gqa_8_2"].make(torch.float64, requires_grad=False)
    options = OPTIONS[label]
    eye = torch.eye(8, dtype=torch.float64)
    out = dense_attend(
        Attend(**options),
        q,
        k,
        v,
        compose_scores=lambda s: mix_heads(s, eye),
        compose_weights=lambda p: mix_heads(p, eye),
    )
    expected = attnkit.attention(q, k, v, backend="reference", **options)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_head_specific_mask_is_reapplied_after_mixing():
    q, k, v = CASES["self_odd_63"].make(torch.float64, requires_grad=False)
    allowed = torch.rand(1, 4, 63, 63, generator=torch.Generator().manual_seed(0)) > 0.5
    allowed |= torch.eye(63, dtype=torch.bool)
    mask = masks.from_dense(allowed)
    mix = torch.full((4, 4), 0.25, dtype=torch.float64)
    weights = {}

    def spy(p):
        mixed = mix_heads(p, mix)
        weights["mixed"] = mixed
        return mixed

    out = dense_attend(Attend(mask=mask), q, k, v, compose_weights=spy)
    kept = weights["mixed"] * allowed
    expected = torch.einsum("bhqk,bkhd->bqhd", kept, v)
    torch.testing.assert_close(out, expected)
