"""MLA: the naive form against DeepSeek-V2's equations (2x rule), the absorbed decoding form
against the naive form (one shot, chunked prefill, token by token, gradients), cache sizes and
errors."""

from __future__ import annotations

import pytest
import torch
from layout_helpers import CachingAttend, check_layout, llama_rope, make_x, randomize
from torch import nn

from attnkit import masks
from attnkit.attend import Attend
from attnkit.heads import MLACache, MultiHeadLatentAttention, mla_reference

C = 48
CONFIGS = {
    "deepseek_like": dict(n_heads=4, head_dim=16, kv_rank=24, rope_dim=8),
    "q_rank_rope_heads_2": dict(
        n_heads=4, head_dim=16, kv_rank=20, rope_dim=8, q_rank=24, rope_heads=2
    ),
    "nope_0_value_12": dict(
        n_heads=4, head_dim=16, kv_rank=16, rope_dim=16, nope_dim=0, value_dim=12
    ),
}


def build(label: str, seed: int = 0, **extra) -> MultiHeadLatentAttention:
    mla = MultiHeadLatentAttention(C, **CONFIGS[label], **extra)
    randomize(mla, seed=seed, skip=("layernorm",))
    return mla


def reference_for(mla: MultiHeadLatentAttention, causal: bool = True):
    def reference(x, **p):
        return mla_reference(
            x,
            p["kv_a_proj_with_mqa.weight"],
            p["kv_b_proj.weight"],
            n_heads=mla.n_heads,
            kv_rank=mla.kv_rank,
            nope_dim=mla.nope_dim,
            rope_dim=mla.rope_dim,
            value_dim=mla.value_dim,
            rope_heads=mla.rope_heads,
            q_weight=p.get("q_proj.weight"),
            q_a_weight=p.get("q_a_proj.weight"),
            q_b_weight=p.get("q_b_proj.weight"),
            q_bias=p.get("q_proj.bias", p.get("q_a_proj.bias")),
            kv_a_bias=p.get("kv_a_proj_with_mqa.bias"),
            rotary=llama_rope,
            causal=causal,
        )

    return reference


@pytest.mark.parametrize("label", sorted(CONFIGS))
def test_naive_form_matches_paper_equations(label, causal):
    mla = build(label, seed=1)
    check_layout(mla, reference_for(mla), make_x(2, 33, C), causal).assert_ok()


def test_naive_form_with_biases(causal):
    mla = build("deepseek_like", seed=2, bias=True)
    check_layout(mla, reference_for(mla), make_x(2, 30, C), causal).assert_ok()


class AbsorbedForm(nn.Module):
    """``mla.decode`` with an empty cache as a module, so its weights can be inputs."""

    def __init__(self, mla: MultiHeadLatentAttention):
        super().__init__()
        self.mla = mla

    def forward(self, x, attend, rotary=None, positions=None):
        return self.mla.decode(x, None, attend, rotary, positions)[0]


def test_absorbed_decoding_gradients_follow_the_2x_rule(causal):
    mla = build("q_rank_rope_heads_2", seed=3)
    reference = reference_for(mla)

    def unprefixed(x, **p):
        return reference(x, **{name.removeprefix("mla."): t for name, t in p.items()})

    check_layout(AbsorbedForm(mla), unprefixed, make_x(2, 31, C), causal).assert_ok()


@pytest.mark.parametrize("label", sorted(CONFIGS))
@pytest.mark.parametrize("latent_norm", [False, True])
def test_absorbed_equals_naive_one_shot_and_token_by_token(label, latent_norm, causal):
    """Exact in float64 (the forms differ only in the order of sums)."""
    mla = build(label, seed=4, latent_norm=latent_norm).double()
    x = make_x(2, 26, C, dtype=torch.float64)
    naive = mla(x, causal, llama_rope)
    one_shot, cache = mla.decode(x, None, causal, llama_rope)
    torch.testing.assert_close(one_shot, naive, rtol=1e-12, atol=1e-12)
    assert cache.length == 26
    steps, cache = [], None
    for chunk in (slice(0, 17), *(slice(t, t + 1) for t in range(17, 26))):
        out, cache = mla.decode(x[:, chunk], cache, causal, llama_rope)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), naive, rtol=1e-12, atol=1e-12)
    assert cache.latent.shape == (2, 26, mla.kv_rank)
    assert cache.k_rope.shape == (2, 26, mla.rope_heads, mla.rope_dim)


def test_absorbed_equals_naive_fp32(causal):
    mla = build("deepseek_like", seed=4)
    x = make_x(2, 26, C)
    naive = mla(x, causal, llama_rope)
    absorbed, _ = mla.decode(x, None, causal, llama_rope)
    assert (absorbed - naive).abs().max() <= 2e-6 * naive.abs().max()


def test_naive_form_decodes_through_a_kv_cache(causal):
    mla = build("deepseek_like", seed=5)
    x = make_x(1, 20, C)
    cached = CachingAttend(causal)
    steps = [mla(x[:, :12], cached, llama_rope, torch.arange(12))]
    steps += [
        mla(x[:, t : t + 1], cached, llama_rope, torch.arange(t, t + 1)) for t in range(12, 20)
    ]
    torch.testing.assert_close(
        torch.cat(steps, 1), mla(x, causal, llama_rope), rtol=1e-5, atol=2e-6
    )


def test_absorbed_form_honours_the_attend_options():
    mla = build("deepseek_like", seed=6).double()
    x = make_x(2, 24, C, dtype=torch.float64)
    window = Attend(mask=masks.causal() & masks.sliding_window(5), scale=0.3)
    naive = mla(x, window, llama_rope)
    absorbed, _ = mla.decode(x, None, window, llama_rope)
    torch.testing.assert_close(absorbed, naive, rtol=1e-12, atol=1e-12)


def test_kv_cache_dims():
    mla = MultiHeadLatentAttention(C, n_heads=4, head_dim=16, kv_rank=64, rope_dim=8)
    assert mla.kv_cache_dims() == {"latent": 64, "k_rope": 8}
    assert mla.kv_cache_bytes_per_token(torch.bfloat16) == (64 + 8) * 2
    with torch.device("meta"):  # sizes only: DeepSeek-V2's attention, no memory
        deepseek_v2 = MultiHeadLatentAttention(5120, n_heads=128, head_dim=128, q_rank=1536)
    assert deepseek_v2.kv_cache_dims() == {"latent": 512, "k_rope": 64}  # 4.5 d_h per token
    assert deepseek_v2.rotary_dim == 64


def test_cache_append():
    cache = MLACache(torch.zeros(1, 3, 4), torch.zeros(1, 3, 2, 6))
    cache = cache.append(torch.ones(1, 2, 4), torch.ones(1, 2, 2, 6))
    assert cache.length == 5 and cache.k_rope.shape == (1, 5, 2, 6)


def test_errors_name_the_problem(causal):
    with pytest.raises(ValueError, match="rope_dim must be even"):
        MultiHeadLatentAttention(C, 4, 16, rope_dim=7)
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of rope_heads=3"):
        MultiHeadLatentAttention(C, 4, 16, rope_heads=3)
    with pytest.raises(ValueError, match="MLA has no key/value heads"):
        MultiHeadLatentAttention(C, 4, 16, n_kv_heads=2)
    with pytest.raises(ValueError, match="nope_dim must be an int >= 0"):
        MultiHeadLatentAttention(C, 4, 16, nope_dim=-1)
    mla = build("deepseek_like")
    with pytest.raises(TypeError, match=r"needs a plain attnkit\.nn\.Attend"):
        mla.decode(make_x(1, 4, C), None, CachingAttend(causal), llama_rope)
