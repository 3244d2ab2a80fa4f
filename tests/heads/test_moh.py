"""MoH: gates and heads against the token-by-token reference (2x rule), the exact reduction to
MHA/GQA, routing properties, the load-balancing loss and errors."""

from __future__ import annotations

import pytest
import torch
from layout_helpers import CachingAttend, check_layout, llama_rope, make_x, randomize

from attnkit.heads import GroupedQueryAttention, MixtureOfHeadsAttention, moh_reference

C, D = 48, 16


def reference_for(moh: MixtureOfHeadsAttention):
    def reference(x, **p):
        return moh_reference(
            x,
            p["q_proj.weight"],
            p["k_proj.weight"],
            p["v_proj.weight"],
            n_heads=moh.n_heads,
            n_kv_heads=moh.n_kv_heads,
            n_shared=moh.n_shared,
            top_k=moh.top_k,
            router_weight=p.get("router.weight"),
            shared_router_weight=p.get("shared_router.weight"),
            head_type_router_weight=p.get("head_type_router.weight"),
            rotary=llama_rope,
        )

    return reference


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "n_shared", "top_k"),
    [(6, 2, 2, 2), (6, 6, 0, 3), (4, 2, 1, 2), (4, 4, 4, None)],
)
def test_moh_matches_reference(n_heads, n_kv_heads, n_shared, top_k, causal):
    moh = MixtureOfHeadsAttention(
        C, n_heads, D, n_kv_heads=n_kv_heads, n_shared=n_shared, top_k=top_k
    )
    randomize(moh, seed=1)
    check_layout(moh, reference_for(moh), make_x(2, 33, C), causal).assert_ok()


def test_all_heads_with_unit_gates_is_mha(causal):
    """Zero routers and top_k = all routed heads: every gate is 1, the layout is GQA."""
    moh = MixtureOfHeadsAttention(C, 6, D, n_kv_heads=2, n_shared=2, top_k=4)
    randomize(moh, seed=2)
    with torch.no_grad():
        for router in (moh.router, moh.shared_router, moh.head_type_router):
            router.weight.zero_()
    gqa = GroupedQueryAttention(C, 6, D, n_kv_heads=2)
    gqa.load_state_dict(moh.state_dict(), strict=False)
    x = make_x(2, 30, C)
    gates, _ = moh.gates(x)
    torch.testing.assert_close(gates, torch.ones_like(gates))
    torch.testing.assert_close(moh(x, causal, llama_rope), gqa(x, causal, llama_rope))


def test_routing_selects_top_k_and_weighs_shared_against_routed():
    moh = MixtureOfHeadsAttention(C, 8, D, n_shared=3, top_k=2)
    randomize(moh, seed=3)
    x = make_x(2, 10, C)
    gates, aux = moh.gates(x)
    routed, shared = gates[..., 3:], gates[..., :3]
    assert ((routed > 0).sum(-1) == 2).all()
    assert (shared > 0).all()
    balance = 2 * torch.softmax(moh.head_type_router(x), dim=-1)
    torch.testing.assert_close(shared.sum(-1), 3 * balance[..., 0])
    torch.testing.assert_close(routed.sum(-1), 2 * balance[..., 1])
    p = torch.softmax(moh.router(x), -1)
    chosen = (routed > 0).float()
    expected_aux = 5 * (p.flatten(0, 1).mean(0) * chosen.flatten(0, 1).mean(0)).sum()
    torch.testing.assert_close(aux, expected_aux)


def test_forward_records_aux_loss_and_decodes_through_a_cache(causal):
    moh = MixtureOfHeadsAttention(C, 4, D, n_kv_heads=2, n_shared=1, top_k=2)
    randomize(moh, seed=4)
    x = make_x(1, 14, C)
    full = moh(x, causal, llama_rope)
    assert moh.aux_loss is not None and moh.aux_loss.requires_grad
    cached = CachingAttend(causal)
    steps = [moh(x[:, :9], cached, llama_rope, torch.arange(9))]
    steps += [
        moh(x[:, t : t + 1], cached, llama_rope, torch.arange(t, t + 1)) for t in range(9, 14)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"n_shared must be an int in \[0, n_heads=4\]"):
        MixtureOfHeadsAttention(C, 4, D, n_shared=5)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, n_heads - n_shared = 3\]"):
        MixtureOfHeadsAttention(C, 4, D, n_shared=1, top_k=4)
    with pytest.raises(ValueError, match="every head is shared"):
        MixtureOfHeadsAttention(C, 4, D, n_shared=4, top_k=1)
