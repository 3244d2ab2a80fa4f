"""Talking-heads attention: against Shazeer et al.'s pseudo-code (2x rule), identity mixing
equal to GQA, and the refusal of cache-wrapped ``attend`` and fused backends."""

from __future__ import annotations

import pytest
import torch
from layout_helpers import CachingAttend, check_layout, llama_rope, make_x, randomize

from attnkit import masks
from attnkit.attend import Attend
from attnkit.heads import GroupedQueryAttention, TalkingHeadsAttention, talking_heads_reference

C, D = 48, 16


def reference_for(layout: TalkingHeadsAttention):
    def reference(x, **p):
        return talking_heads_reference(
            x,
            p["q_proj.weight"],
            p["k_proj.weight"],
            p["v_proj.weight"],
            p["logits_mix"],
            p["weights_mix"],
            n_heads=layout.n_heads,
            n_kv_heads=layout.n_kv_heads,
            rotary=llama_rope,
        )

    return reference


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_talking_heads_match_reference(n_kv_heads, causal):
    layout = TalkingHeadsAttention(C, 4, D, n_kv_heads=n_kv_heads)
    randomize(layout, seed=1)
    check_layout(layout, reference_for(layout), make_x(2, 35, C), causal).assert_ok()


def test_identity_mixing_is_gqa(causal):
    layout = TalkingHeadsAttention(C, 4, D, n_kv_heads=2)
    randomize(layout, seed=2, skip=("mix",))
    gqa = GroupedQueryAttention(C, 4, D, n_kv_heads=2)
    gqa.load_state_dict(layout.state_dict(), strict=False)
    x = make_x(2, 30, C)
    torch.testing.assert_close(
        layout(x, causal, llama_rope), gqa(x, causal, llama_rope), rtol=1e-5, atol=1e-5
    )


def test_refuses_what_it_cannot_honour(causal):
    layout = TalkingHeadsAttention(C, 4, D)
    x = make_x(1, 6, C)
    with pytest.raises(TypeError, match="cannot run through a KV cache"):
        layout(x, CachingAttend(causal))
    with pytest.raises(ValueError, match="cannot run on backend 'sdpa'"):
        layout(x, Attend(mask=masks.causal(), backend="sdpa"))
    assert not layout.supports_kv_cache
