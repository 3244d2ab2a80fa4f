"""MHA/GQA/MQA layouts: 2x rule against the head-by-head reference, from_mha, cache sizes,
decoding through a KV cache, the LAYOUTS table and input errors."""

from __future__ import annotations

import pytest
import torch
from layout_helpers import CachingAttend, check_layout, llama_rope, make_x, randomize

from attnkit import masks
from attnkit.attend import Attend
from attnkit.heads import (
    LAYOUTS,
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    gqa_reference,
    mean_pool_heads,
)

C, D = 48, 16


def reference_for(layout: GroupedQueryAttention, causal: bool = True):
    def reference(x, **p):
        return gqa_reference(
            x,
            p["q_proj.weight"],
            p["k_proj.weight"],
            p["v_proj.weight"],
            q_bias=p.get("q_proj.bias"),
            k_bias=p.get("k_proj.bias"),
            v_bias=p.get("v_proj.bias"),
            n_heads=layout.n_heads,
            n_kv_heads=layout.n_kv_heads,
            rotary=llama_rope,
            causal=causal,
        )

    return reference


@pytest.mark.parametrize(
    ("label", "n_heads", "n_kv_heads", "bias", "T"),
    [
        ("mha_4", 4, 4, False, 33),
        ("gqa_4_2_bias", 4, 2, True, 40),
        ("mqa_4", 4, 1, False, 37),
    ],
)
def test_gqa_matches_reference_fp32(label, n_heads, n_kv_heads, bias, T, causal):
    layout = GroupedQueryAttention(C, n_heads, D, n_kv_heads=n_kv_heads, bias=bias)
    randomize(layout, seed=1)
    check_layout(layout, reference_for(layout), make_x(2, T, C), causal).assert_ok()


def test_gqa_matches_reference_bf16(causal):
    layout = GroupedQueryAttention(C, 4, D, n_kv_heads=2)
    randomize(layout, seed=2)
    report = check_layout(
        layout, reference_for(layout), make_x(2, 35, C), causal, dtype=torch.bfloat16
    )
    report.assert_ok()


def test_gqa_non_causal_and_batched_positions():
    layout = GroupedQueryAttention(C, 4, D, n_kv_heads=2)
    randomize(layout, seed=3)
    x = make_x(2, 21, C)
    positions = torch.stack([torch.arange(21), torch.arange(5, 26)])
    out = layout(x, Attend(), llama_rope, positions)
    for b in range(2):
        expected = gqa_reference(
            x[b : b + 1],
            layout.q_proj.weight,
            layout.k_proj.weight,
            layout.v_proj.weight,
            n_heads=4,
            n_kv_heads=2,
            rotary=llama_rope,
            positions=positions[b],
            causal=False,
        )
        torch.testing.assert_close(out[b : b + 1], expected, rtol=1e-5, atol=1e-5)


def test_decoding_through_a_kv_cache_matches_full_sequence(causal):
    layout = GroupedQueryAttention(C, 4, D, n_kv_heads=2)
    randomize(layout, seed=4)
    x = make_x(2, 30, C)
    full = layout(x, causal, llama_rope)
    cached = CachingAttend(causal)
    steps = [layout(x[:, :20], cached, llama_rope, torch.arange(20))]
    for t in range(20, 30):
        steps.append(layout(x[:, t : t + 1], cached, llama_rope, torch.arange(t, t + 1)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_from_mha_mean_pools_groups():
    mha = MultiHeadAttention(C, 4, D, bias=True)
    randomize(mha, seed=5)
    gqa = GroupedQueryAttention.from_mha(mha, 2)
    k = mha.k_proj.weight.detach().view(4, D, C)
    torch.testing.assert_close(gqa.k_proj.weight, torch.cat([(k[0] + k[1]) / 2, (k[2] + k[3]) / 2]))
    torch.testing.assert_close(gqa.q_proj.weight, mha.q_proj.weight)
    vb = mha.v_proj.bias.detach().view(4, D)
    torch.testing.assert_close(gqa.v_proj.bias, torch.cat([vb[:2].mean(0), vb[2:].mean(0)]))
    mqa = GroupedQueryAttention.from_mha(mha, 1)
    torch.testing.assert_close(mqa.k_proj.weight, k.mean(0))


def test_from_mha_exact_cases(causal):
    """n_kv_heads = Hq reproduces MHA; K/V heads equal within groups survive pooling."""
    x = make_x(2, 33, C)
    mha = MultiHeadAttention(C, 4, D)
    randomize(mha, seed=6)
    same = GroupedQueryAttention.from_mha(mha, 4)
    torch.testing.assert_close(same(x, causal, llama_rope), mha(x, causal, llama_rope))
    with torch.no_grad():
        for proj in (mha.k_proj, mha.v_proj):
            heads = proj.weight.view(4, D, C)
            heads[1].copy_(heads[0])
            heads[3].copy_(heads[2])
    gqa = GroupedQueryAttention.from_mha(mha, 2)
    torch.testing.assert_close(gqa(x, causal, llama_rope), mha(x, causal, llama_rope))


def test_mean_pool_heads_and_errors():
    w = torch.arange(4 * 2 * 3, dtype=torch.float32).view(8, 3)
    pooled = mean_pool_heads(w, n_heads=4, n_groups=2)
    torch.testing.assert_close(
        pooled,
        torch.stack([(w[0] + w[2]) / 2, (w[1] + w[3]) / 2, (w[4] + w[6]) / 2, (w[5] + w[7]) / 2]),
    )
    with pytest.raises(ValueError, match="not a multiple"):
        mean_pool_heads(w, n_heads=4, n_groups=3)
    gqa = GroupedQueryAttention(C, 4, D, n_kv_heads=2)
    with pytest.raises(ValueError, match="needs an MHA layout"):
        GroupedQueryAttention.from_mha(gqa, 1)


def test_kv_cache_dims_and_bytes():
    assert MultiHeadAttention(C, 4, D).kv_cache_dims() == {"k": 4 * D, "v": 4 * D}
    gqa = GroupedQueryAttention(C, 4, D, n_kv_heads=2)
    assert gqa.kv_cache_dims() == {"k": 2 * D, "v": 2 * D}
    assert gqa.kv_cache_bytes_per_token(torch.bfloat16) == 2 * 2 * D * 2
    assert gqa.kv_cache_bytes_per_token(torch.float32) == 2 * 2 * D * 4
    assert MultiQueryAttention(C, 4, D).kv_cache_dims() == {"k": D, "v": D}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_build_by_name_as_a_layer_does(name, causal):
    """``Attention`` calls ``LAYOUTS[name](d_model, n_heads, head_dim, n_kv_heads=...)``."""
    n_kv_heads = {"mha": 4, "mqa": 1, "mla": 4}.get(name, 2)
    layout = LAYOUTS[name](d_model=C, n_heads=4, head_dim=D, n_kv_heads=n_kv_heads)
    x = make_x(2, 9, C)
    out = layout(x, causal, llama_rope, torch.arange(9))
    assert out.shape == (2, 9, 4, layout.value_dim)
    assert layout.out_features == 4 * layout.value_dim
    assert sum(layout.kv_cache_dims().values()) > 0


def test_errors_name_the_problem(causal):
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of n_kv_heads=3"):
        GroupedQueryAttention(C, 4, D, n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        GroupedQueryAttention(C, 4, 0)
    with pytest.raises(ValueError, match="mha has one key/value head per query head"):
        MultiHeadAttention(C, 4, D, n_kv_heads=2)
    with pytest.raises(ValueError, match="mqa has a single key/value head"):
        MultiQueryAttention(C, 4, D, n_kv_heads=4)
    layout = GroupedQueryAttention(C, 4, D, n_kv_heads=2)
    with pytest.raises(ValueError, match=r"x must be \[B, T, C\] with C = d_model = 48"):
        layout(torch.randn(2, 5, 40), causal)
    with pytest.raises(ValueError, match=r"x must be \[B, T, C\]"):
        layout(torch.randn(5, 48), causal)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        layout([[1.0]], causal)


def test_sliding_window_mask_passes_through(causal):
    layout = GroupedQueryAttention(C, 4, D, n_kv_heads=2)
    randomize(layout, seed=7)
    x = make_x(1, 30, C)
    window = Attend(mask=masks.causal() & masks.sliding_window(3))
    out = layout(x, window, llama_rope)
    q, k, v = layout.qkv(x, llama_rope, None)
    import attnkit

    torch.testing.assert_close(out, attnkit.attention(q, k, v, mask=window.mask))
