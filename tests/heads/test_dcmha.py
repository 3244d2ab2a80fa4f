"""DCMHA: against the per-pair composition-matrix reference (2x rule), the exact reduction to
GQA at initialisation, each branch reaching the output, and cache sizes."""

from __future__ import annotations

import pytest
import torch
from layout_helpers import CachingAttend, check_layout, llama_rope, make_x, randomize

from attnkit.heads import DynamicallyComposableMHA, GroupedQueryAttention, dcmha_reference

C, D = 48, 16


def reference_for(layout: DynamicallyComposableMHA):
    def reference(x, **p):
        return dcmha_reference(
            x,
            p["q_proj.weight"],
            p["k_proj.weight"],
            p["v_proj.weight"],
            p["static_mix"],
            p["dynamic_in"],
            p["dynamic_out"],
            p["gate_proj"],
            n_heads=layout.n_heads,
            n_kv_heads=layout.n_kv_heads,
            rotary=llama_rope,
        )

    return reference


def trained_like(layout: DynamicallyComposableMHA, seed: int) -> None:
    """Random projections and small non-zero dynamic branches around the identity."""
    randomize(layout, seed=seed, gain=1.0, skip=("static_mix", "dynamic", "gate_proj"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, std in (
            (layout.static_mix, 0.2),
            (layout.dynamic_in, C**-0.5),
            (layout.dynamic_out, 0.2),
            (layout.gate_proj, 0.5 * C**-0.5),
        ):
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_dcmha_matches_reference(n_kv_heads, causal):
    torch.manual_seed(0)
    layout = DynamicallyComposableMHA(C, 4, D, n_kv_heads=n_kv_heads, rank=2, dynamic_hidden=8)
    trained_like(layout, seed=1)
    check_layout(layout, reference_for(layout), make_x(2, 33, C), causal).assert_ok()


def test_initialisation_is_gqa(causal):
    """Identity static mixing and zero dynamic terms: exactly GQA's computation."""
    layout = DynamicallyComposableMHA(C, 4, D, n_kv_heads=2)
    randomize(layout, seed=2, skip=("static_mix", "dynamic", "gate_proj"))
    gqa = GroupedQueryAttention(C, 4, D, n_kv_heads=2)
    gqa.load_state_dict(layout.state_dict(), strict=False)
    x = make_x(2, 30, C)
    torch.testing.assert_close(
        layout(x, causal, llama_rope), gqa(x, causal, llama_rope), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("branch", ["static_mix", "dynamic_out", "gate_proj"])
def test_every_branch_changes_the_output(branch, causal):
    layout = DynamicallyComposableMHA(C, 4, D)
    randomize(layout, seed=3, skip=("static_mix", "dynamic_out", "gate_proj"))
    x = make_x(1, 12, C)
    before = layout(x, causal, llama_rope)
    with torch.no_grad():
        getattr(layout, branch).add_(0.1)
    assert (layout(x, causal, llama_rope) - before).abs().max() > 1e-3


def test_cache_dims_and_refusal(causal):
    layout = DynamicallyComposableMHA(C, 4, D, n_kv_heads=2, rank=2)
    assert layout.kv_cache_dims() == {"k": 2 * D, "v": 2 * D, "key_dynamic": 2 * (2 * 2 * 4 + 4)}
    with pytest.raises(TypeError, match="cannot run through a KV cache"):
        layout(make_x(1, 4, C), CachingAttend(causal))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        DynamicallyComposableMHA(C, 4, D, rank=0)
