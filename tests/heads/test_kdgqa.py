"""KDGQA/DGQA: the allocation rule on hand-computed cases, the layouts against the group-by-group
reference (2x rule), the exact reduction to GQA for equal norms, DGQA's moving average, and
the refusal of cache-wrapped ``attend``."""

from __future__ import annotations

import pytest
import torch
from layout_helpers import CachingAttend, check_layout, llama_rope, make_x, randomize

from attnkit.heads import (
    DynamicKeyDrivenGQA,
    GroupedQueryAttention,
    KeyDrivenGQA,
    allocate_query_heads,
    kdgqa_reference,
)
from attnkit.heads.kdgqa import group_index, key_head_norms

C, D = 48, 16


@pytest.mark.parametrize(
    ("norms", "n_heads", "expected"),
    [
        # min-max scaled [0, 1/3, 2/3, 1] -> [0, 1.33, 2.67, 4] * ... rounds to [0, 1, 3, 4]
        ([1.0, 2.0, 3.0, 4.0], 8, [0, 1, 3, 4]),
        # scaled [0, 0.5, 1] -> [0, 2, 4] of 6
        ([2.0, 3.0, 4.0], 6, [0, 2, 4]),
        # scaled [0, 1, 1] -> [0, 4.5, 4.5] -> half to even [0, 4, 4], smallest gains one
        ([1.0, 5.0, 5.0], 9, [1, 4, 4]),
        # scaled [1, 0, 0.1] -> [6.36, 0, 0.64] -> [6, 0, 1]
        ([9.0, 2.0, 2.7], 7, [6, 0, 1]),
        # equal norms: standard grouping
        ([3.0, 3.0, 3.0], 9, [3, 3, 3]),
        ([3.0, 3.0 * (1 + 1e-9), 3.0], 6, [2, 2, 2]),
    ],
)
def test_allocation_rule(norms, n_heads, expected):
    sizes = allocate_query_heads(torch.tensor(norms), n_heads)
    assert sizes == expected
    assert sum(sizes) == n_heads


def test_allocation_sums_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        norms = torch.rand(4, generator=g) * 10
        sizes = allocate_query_heads(norms, 12)
        assert sum(sizes) == 12 and min(sizes) >= 0
        assert sizes == allocate_query_heads(norms.clone(), 12)
    assert group_index([2, 0, 1]).tolist() == [0, 0, 2]


def reference_for(layout, group_sizes=None):
    def reference(x, **p):
        return kdgqa_reference(
            x,
            p["q_proj.weight"],
            p["k_proj.weight"],
            p["v_proj.weight"],
            n_heads=layout.n_heads,
            n_kv_heads=layout.n_kv_heads,
            group_sizes=group_sizes,
            rotary=llama_rope,
        )

    return reference


def uneven_keys(layout, seed):
    """Random weights with key heads of clearly different norms."""
    randomize(layout, seed=seed)
    with torch.no_grad():
        heads = layout.k_proj.weight.view(layout.n_kv_heads, D, C)
        for g in range(layout.n_kv_heads):
            heads[g] *= 0.5 + g


def test_kdgqa_matches_reference(causal):
    layout = KeyDrivenGQA(C, 8, D, n_kv_heads=4)
    uneven_keys(layout, seed=1)
    x = make_x(2, 33, C)
    check_layout(layout, reference_for(layout), x, causal).assert_ok()
    assert layout.last_group_sizes != [2, 2, 2, 2]
    assert layout.last_group_sizes == allocate_query_heads(
        key_head_norms(layout.qkv(x, llama_rope, None)[1]), 8
    )


def test_equal_key_norms_give_standard_gqa(causal):
    layout = KeyDrivenGQA(C, 6, D, n_kv_heads=3)
    randomize(layout, seed=2)
    with torch.no_grad():
        heads = layout.k_proj.weight.view(3, D, C)
        heads[1].copy_(heads[0].flip(0))  # a permutation of features keeps every norm
        heads[2].copy_(heads[0].roll(3, 0))
    gqa = GroupedQueryAttention(C, 6, D, n_kv_heads=3)
    gqa.load_state_dict(layout.state_dict())
    x = make_x(2, 25, C)
    torch.testing.assert_close(layout(x, causal, llama_rope), gqa(x, causal, llama_rope))
    assert layout.last_group_sizes == [2, 2, 2]


def test_dgqa_moving_average_and_frozen_eval(causal):
    layout = DynamicKeyDrivenGQA(C, 8, D, n_kv_heads=4, ema_decay=0.5)
    uneven_keys(layout, seed=3)
    x1, x2 = make_x(2, 20, C, seed=1), make_x(2, 20, C, seed=2)
    layout.eval()
    layout(x1, causal, llama_rope)
    assert layout.last_group_sizes == [2, 2, 2, 2]  # no update yet: equal (zero) averages
    layout.train()
    n1 = key_head_norms(layout.qkv(x1, llama_rope, None)[1])
    n2 = key_head_norms(layout.qkv(x2, llama_rope, None)[1])
    layout(x1, causal, llama_rope)
    torch.testing.assert_close(layout.norm_ema, n1)
    layout(x2, causal, llama_rope)
    torch.testing.assert_close(layout.norm_ema, 0.5 * n1 + 0.5 * n2)
    layout.eval()
    ema = layout.norm_ema.clone()
    sizes = allocate_query_heads(ema, 8)
    layout.eval()
    check_layout(layout, reference_for(layout, sizes), x1, causal).assert_ok()
    torch.testing.assert_close(layout.norm_ema, ema)
    assert layout.last_group_sizes == sizes


def test_cache_wrapped_attend_is_refused(causal):
    layout = KeyDrivenGQA(C, 4, D, n_kv_heads=2)
    with pytest.raises(TypeError, match="cannot run through a KV cache"):
        layout(make_x(1, 5, C), CachingAttend(causal), llama_rope)
    assert not layout.supports_kv_cache


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        DynamicKeyDrivenGQA(C, 4, D, n_kv_heads=2, ema_decay=1.0)
    with pytest.raises(ValueError, match="tie_tolerance must be >= 0"):
        KeyDrivenGQA(C, 4, D, tie_tolerance=-1.0)
    with pytest.raises(ValueError, match="not a multiple of the 3 key/value heads"):
        allocate_query_heads(torch.ones(3), 4)
