"""Knocking-heads attention: both variants against the paper's equations (2x rule), identity
initialisation equal to GQA, folding the linear maps into the projections, and errors."""

from __future__ import annotations

import pytest
import torch
from layout_helpers import CachingAttend, check_layout, llama_rope, make_x, randomize

from attnkit.heads import GroupedQueryAttention, KnockingHeadsAttention, knocking_heads_reference

C, D = 48, 16


def reference_for(layout: KnockingHeadsAttention):
    def reference(x, **p):
        maps = {}
        for name, t in p.items():
            if name.startswith("knocks."):
                _, target, part = name.split(".")
                maps.setdefault(target, {})[part] = t
        return knocking_heads_reference(
            x,
            p["q_proj.weight"],
            p["k_proj.weight"],
            p["v_proj.weight"],
            maps,
            n_heads=layout.n_heads,
            n_kv_heads=layout.n_kv_heads,
            rotary=llama_rope,
        )

    return reference


@pytest.mark.parametrize(
    ("variant", "targets", "n_kv_heads"),
    [("mlp", ("v",), 2), ("linear", ("q", "k", "v"), 2), ("mlp", ("q", "k", "v"), 4)],
)
def test_knocking_heads_match_reference(variant, targets, n_kv_heads, causal):
    layout = KnockingHeadsAttention(
        C, 4, D, n_kv_heads=n_kv_heads, variant=variant, targets=targets
    )
    randomize(layout, seed=1, gain=1.0)
    with torch.no_grad():  # near-identity maps, as after some training
        for name, p in layout.knocks.named_parameters():
            if not name.endswith("gate"):
                p.add_(torch.eye(D))
    check_layout(layout, reference_for(layout), make_x(2, 33, C), causal).assert_ok()


@pytest.mark.parametrize("variant", ["linear", "mlp"])
def test_identity_initialisation_is_gqa(variant, causal):
    layout = KnockingHeadsAttention(C, 4, D, n_kv_heads=2, variant=variant, targets=("q", "k", "v"))
    randomize(layout, seed=2, skip=("knocks",))
    gqa = GroupedQueryAttention(C, 4, D, n_kv_heads=2)
    gqa.load_state_dict(layout.state_dict(), strict=False)
    x = make_x(2, 27, C)
    torch.testing.assert_close(layout(x, causal, llama_rope), gqa(x, causal, llama_rope))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_maps_fold_into_the_projections(bias, causal):
    layout = KnockingHeadsAttention(
        C, 4, D, n_kv_heads=2, bias=bias, variant="linear", targets=("q", "k", "v")
    )
    randomize(layout, seed=3)
    layout.double()
    folded = layout.absorbed()
    assert type(folded) is GroupedQueryAttention
    x = make_x(2, 21, C, dtype=torch.float64)
    torch.testing.assert_close(folded(x, causal, llama_rope), layout(x, causal, llama_rope))


def test_decodes_through_a_kv_cache(causal):
    layout = KnockingHeadsAttention(C, 4, D, n_kv_heads=2)
    randomize(layout, seed=4)
    x = make_x(1, 12, C)
    cached = CachingAttend(causal)
    steps = [layout(x[:, :8], cached, llama_rope, torch.arange(8))]
    steps += [
        layout(x[:, t : t + 1], cached, llama_rope, torch.arange(t, t + 1)) for t in range(8, 12)
    ]
    torch.testing.assert_close(
        torch.cat(steps, 1), layout(x, causal, llama_rope), rtol=1e-5, atol=1e-5
    )


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown knocking-heads variant 'conv'"):
        KnockingHeadsAttention(C, 4, D, variant="conv")
    with pytest.raises(ValueError, match="targets must be distinct names"):
        KnockingHeadsAttention(C, 4, D, targets=("v", "o"))
    with pytest.raises(ValueError, match="targets must be distinct names"):
        KnockingHeadsAttention(C, 4, D, targets=())
    with pytest.raises(ValueError, match="only the linear variant folds"):
        KnockingHeadsAttention(C, 4, D, variant="mlp").absorbed()
