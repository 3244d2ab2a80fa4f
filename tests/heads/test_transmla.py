"""TransMLA: a GQA layer converted to MLA gives the same outputs (naive and absorbed forms) and
the same KV-cache size, under RoPE; the conversion is a starting point for training."""

from __future__ import annotations

import pytest
import torch
from layout_helpers import llama_rope, make_x, randomize
from torch import nn

from attnkit.heads import (
    GroupedQueryAttention,
    KnockingHeadsAttention,
    MixtureOfHeadsAttention,
    MultiQueryAttention,
    mla_from_gqa,
)

C, D = 96, 64


def smollm2_like(bias: bool = False, seed: int = 0) -> GroupedQueryAttention:
    """SmolLM2-135M's head layout (9 query, 3 KV heads of 64 dims) at a reduced width."""
    gqa = GroupedQueryAttention(C, 9, D, n_kv_heads=3, bias=bias)
    randomize(gqa, seed=seed)
    return gqa


@pytest.mark.parametrize("bias", [False, True])
def test_converted_layer_gives_the_same_logits(bias, causal):
    gqa = smollm2_like(bias=bias, seed=1)
    mla = mla_from_gqa(gqa)
    o_proj = nn.Linear(9 * D, C)
    x = make_x(2, 41, C)
    positions = torch.arange(3, 44)
    with torch.no_grad():
        expected = o_proj(gqa(x, causal, llama_rope, positions).flatten(2))
        naive = o_proj(mla(x, causal, llama_rope, positions).flatten(2))
        absorbed, cache = mla.decode(x, None, causal, llama_rope, positions)
        absorbed = o_proj(absorbed.flatten(2))
    scale = expected.abs().max()
    assert (naive - expected).abs().max() <= 1e-6 * scale  # measured: 0 (bitwise equal)
    assert (absorbed - expected).abs().max() <= 2e-6 * scale  # measured: ~6e-7 relative
    assert cache.latent.shape == (2, 41, 3 * D)


def test_exact_in_float64_including_token_by_token_decoding(causal):
    gqa = smollm2_like(seed=2).double()
    mla = mla_from_gqa(gqa)
    assert mla.kv_b_proj.weight.dtype == torch.float64
    x = make_x(2, 30, C, dtype=torch.float64)
    expected = gqa(x, causal, llama_rope)
    torch.testing.assert_close(mla(x, causal, llama_rope), expected, rtol=1e-12, atol=1e-12)
    steps, cache = [], None
    for chunk in (slice(0, 20), *(slice(t, t + 1) for t in range(20, 30))):
        out, cache = mla.decode(x[:, chunk], cache, causal, llama_rope)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=1e-12, atol=1e-12)


def test_same_kv_cache_size_and_mla_shape():
    gqa = smollm2_like()
    mla = mla_from_gqa(gqa)
    assert mla.kv_cache_bytes_per_token() == gqa.kv_cache_bytes_per_token()
    assert mla.kv_cache_dims() == {"latent": 3 * D, "k_rope": 3 * D}
    assert (mla.nope_dim, mla.rope_dim, mla.value_dim, mla.rope_heads) == (0, D, D, 3)
    w_uk, w_uv = mla.up_projections()
    assert w_uk.shape == (9, 0, 3 * D)
    for h in range(9):
        expected = torch.zeros(D, 3, D)
        expected[:, h // 3] = torch.eye(D)
        torch.testing.assert_close(w_uv[h], expected.reshape(D, 3 * D))


def test_converted_up_projection_trains(causal):
    """After conversion ``W_UV`` is a trainable parameter that receives gradients."""
    mla = mla_from_gqa(smollm2_like(seed=3))
    assert mla.kv_b_proj.weight.requires_grad
    mla(make_x(1, 12, C), causal, llama_rope).square().sum().backward()
    assert mla.kv_b_proj.weight.grad.abs().sum() > 0


def test_mqa_converts_too(causal):
    mqa = MultiQueryAttention(C, 4, D)
    randomize(mqa, seed=4)
    mqa = mqa.double()
    mla = mla_from_gqa(mqa)
    x = make_x(1, 15, C, dtype=torch.float64)
    torch.testing.assert_close(mla(x, causal, llama_rope), mqa(x, causal, llama_rope))


def test_only_plain_layouts_convert():
    with pytest.raises(TypeError, match="converts plain MHA/GQA/MQA layouts"):
        mla_from_gqa(MixtureOfHeadsAttention(C, 4, D, n_kv_heads=2))
    with pytest.raises(TypeError, match="absorbed"):
        mla_from_gqa(KnockingHeadsAttention(C, 4, D, variant="linear"))
    linear = KnockingHeadsAttention(C, 4, D, n_kv_heads=2, variant="linear", targets=("k", "v"))
    assert mla_from_gqa(linear.absorbed()).rope_heads == 2
