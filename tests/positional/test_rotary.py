"""RoPE: the fast rotation against the explicit rotation matrices (forward and backward), the
relative property, the scalings and their reductions to plain RoPE, and agreement with Hugging
Face transformers' frequencies and ``apply_rotary_pos_emb``."""

from __future__ import annotations

import types
from functools import partial

import pytest
import torch

from attnkit import positional
from attnkit.positional import (
    DynamicNTKScaling,
    LinearScaling,
    NTKScaling,
    Rotary,
    YaRNScaling,
    rotary_reference,
)
from attnkit.testing import check_function

ROTARIES = {
    "plain": Rotary(32),
    "interleaved": Rotary(32, interleaved=True),
    "partial": Rotary(32, rotary_dim=12, base=500.0),
    "partial_interleaved": Rotary(32, rotary_dim=20, interleaved=True),
    "linear": Rotary(32, scaling=LinearScaling(4.0)),
    "ntk": Rotary(32, scaling=NTKScaling(8.0)),
    "dynamic": Rotary(32, scaling=DynamicNTKScaling(2.0, original_max_position=40)),
    "yarn": Rotary(32, scaling=YaRNScaling(16.0, original_max_position=64)),
}


def draw(B=2, T=37, H=4, D=32, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g) * 1.3 + 0.2).to(dtype)


def positions_for(kind: str, B: int = 2, T: int = 37) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(1)
    return {
        "default": None,
        "shared": torch.arange(T) + 5,
        "batched": torch.randint(0, 300, (B, T), generator=g),
    }[kind]


@pytest.mark.parametrize("positions", ["default", "shared", "batched"])
@pytest.mark.parametrize("name", list(ROTARIES))
def test_matches_rotation_matrices_forward_and_backward(name: str, positions: str) -> None:
    rotary = ROTARIES[name]
    pos = positions_for(positions)
    inputs = {"x": draw()} | ({} if pos is None else {"positions": pos})
    check_function(rotary, partial(rotary_reference, rotary), inputs).assert_ok()


@pytest.mark.parametrize("name", ["plain", "partial_interleaved", "yarn"])
def test_matches_rotation_matrices_in_bfloat16(name: str) -> None:
    rotary = ROTARIES[name]
    inputs = {"x": draw(dtype=torch.bfloat16), "positions": positions_for("batched")}
    check_function(rotary, partial(rotary_reference, rotary), inputs).assert_ok()


@pytest.mark.parametrize("name", [n for n in ROTARIES if n != "dynamic"])
def test_scores_depend_only_on_the_offset(name: str) -> None:
    """``<R_m q, R_n k>`` is a function of ``n - m``: shifting both positions changes nothing."""
    rotary = ROTARIES[name]
    q, k = (
        draw(B=1, T=24, dtype=torch.float64, seed=2),
        draw(B=1, T=24, dtype=torch.float64, seed=3),
    )
    m, n = torch.arange(24), torch.randperm(24, generator=torch.Generator().manual_seed(4))

    def scores(shift: int) -> torch.Tensor:
        return torch.einsum("bihd,bjhd->bhij", rotary(q, m + shift), rotary(k, n + shift))

    for shift in (1, 17, 1000):
        torch.testing.assert_close(scores(shift), scores(0), rtol=1e-9, atol=1e-9)


def test_dynamic_ntk_is_relative_at_a_fixed_length() -> None:
    rotary = ROTARIES["dynamic"]  # original length 40: positions below it use plain RoPE
    q, k = draw(B=1, T=16, dtype=torch.float64), draw(B=1, T=16, dtype=torch.float64, seed=1)
    m = torch.arange(16)
    first = torch.einsum("bihd,bjhd->bhij", rotary(q, m), rotary(k, m))
    later = torch.einsum("bihd,bjhd->bhij", rotary(q, m + 20), rotary(k, m + 20))
    torch.testing.assert_close(first, later, rtol=1e-9, atol=1e-9)


def test_interleaved_is_the_half_layout_with_dims_permuted() -> None:
    x, pos = draw(), positions_for("batched")
    perm = torch.cat([torch.arange(0, 32, 2), torch.arange(1, 32, 2)])  # pair i -> (i, i + 16)
    half, interleaved = Rotary(32), Rotary(32, interleaved=True)
    torch.testing.assert_close(half(x[..., perm], pos), interleaved(x, pos)[..., perm])


def test_position_zero_and_pass_through_dims_are_unchanged() -> None:
    x = draw()
    rotary = Rotary(32, rotary_dim=8)
    out = rotary(x, torch.zeros(37, dtype=torch.long))
    torch.testing.assert_close(out, x)
    assert torch.equal(rotary(x)[..., 8:], x[..., 8:])


@pytest.mark.parametrize(
    "scaling",
    [
        LinearScaling(1.0),
        NTKScaling(1.0),
        DynamicNTKScaling(4.0, original_max_position=64),
        YaRNScaling(1.0, original_max_position=16),
    ],
    ids=["linear_1", "ntk_1", "dynamic_within_length", "yarn_1"],
)
def test_scalings_that_reduce_to_plain_rope(scaling) -> None:
    x, pos = draw(dtype=torch.float64), positions_for("shared")  # largest position 41 < 64
    scaled, plain = Rotary(32, scaling=scaling), Rotary(32)
    torch.testing.assert_close(scaled.frequencies(42)[0], plain.frequencies()[0])
    assert scaled.frequencies(42)[1] == 1.0
    torch.testing.assert_close(scaled(x, pos), plain(x, pos))


def test_linear_scaling_interpolates_positions() -> None:
    x = draw(dtype=torch.float64)
    scaled = Rotary(32, scaling=LinearScaling(4.0))
    torch.testing.assert_close(scaled(x, torch.arange(37) * 4), Rotary(32)(x, torch.arange(37)))


def test_yarn_keeps_fast_pairs_interpolates_slow_ones_and_rescales() -> None:
    factor, length = 16.0, 64
    theta, magnitude = Rotary(32, scaling=YaRNScaling(factor, length)).frequencies()
    plain = Rotary(32).frequencies()[0]
    turns = length * plain / (2 * torch.pi)  # rotations of each pair over the original length
    assert torch.equal(theta[turns > 32], plain[turns > 32])
    torch.testing.assert_close(theta[turns < 1], plain[turns < 1] / factor)
    assert magnitude == pytest.approx(0.1 * torch.log(torch.tensor(factor)).item() + 1)


def test_tables_are_cached_per_length_device_and_dtype() -> None:
    rotary = Rotary(16)
    x = draw(D=16)
    rotary(x, torch.arange(37))
    rotary(x, torch.arange(37) + 13)  # largest position 49: still within the 64-row table
    assert list(rotary._tables) == [(64, "cpu", torch.float32, None)]
    rotary(x.double(), torch.arange(37))
    assert len(rotary._tables) == 2
    assert rotary.cos_sin(64, "cpu", torch.float32) is rotary.cos_sin(64, "cpu", torch.float32)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"rotary_dim must be an even int in \[2, head_dim=16\]"):
        Rotary(16, rotary_dim=7)
    with pytest.raises(ValueError, match=r"rotary_dim must be an even int in \[2, head_dim=16\]"):
        Rotary(16, rotary_dim=18)
    with pytest.raises(ValueError, match="base must be > 0"):
        Rotary(16, base=-1.0)
    with pytest.raises(TypeError, match="scaling must be one of LinearScaling"):
        Rotary(16, scaling={"factor": 2.0})
    with pytest.raises(ValueError, match="factor must be >= 1"):
        LinearScaling(0.5)
    with pytest.raises(ValueError, match="beta_fast > beta_slow > 0"):
        YaRNScaling(4.0, 1024, beta_fast=1.0, beta_slow=32.0)
    with pytest.raises(ValueError, match="original_max_position must be a positive int"):
        DynamicNTKScaling(2.0, 0)
    rotary, x = Rotary(16), draw(D=16)
    with pytest.raises(ValueError, match=r"x \[B, T, H, D\] with D = head_dim = 16"):
        rotary(draw(D=32))
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        rotary(x, torch.arange(37.0))
    with pytest.raises(ValueError, match=r"positions must be \[T\] = \[37\] or \[B, T\]"):
        rotary(x, torch.arange(36))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        rotary(x, torch.arange(37) - 1)


# -- Hugging Face transformers ---------------------------------------------------------------

HF_CONFIGS = {
    "default": dict(rope_theta=500000.0),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "dynamic": dict(
        max_position_embeddings=512, rope_scaling={"rope_type": "dynamic", "factor": 4.0}
    ),
    "yarn": dict(
        max_position_embeddings=4096,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    ),
    "yarn_partial_betas": dict(
        max_position_embeddings=4096,
        partial_rotary_factor=0.5,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
        },
    ),
    "yarn_deepseek_mscale": dict(
        max_position_embeddings=4096,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        },
    ),
}


def hf_config(name: str):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, **HF_CONFIGS[name])


def hf_frequencies(config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_frequencies_and_attention_factor_match_transformers(name: str) -> None:
    config = hf_config(name)
    rotary = Rotary.from_hf_config(config)
    assert rotary.head_dim == 64
    expected_theta, expected_factor = hf_frequencies(config)  # dynamic: at its base length
    theta, factor = rotary.frequencies()
    assert theta.shape == expected_theta.shape == (rotary.rotary_dim // 2,)
    torch.testing.assert_close(theta.float(), expected_theta, rtol=2e-7, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_dynamic_ntk_past_its_base_length_matches_transformers() -> None:
    config = hf_config("dynamic")
    expected, _ = hf_frequencies(config, seq_len=2000)
    theta, _ = Rotary.from_hf_config(config).frequencies(2000)
    torch.testing.assert_close(theta.float(), expected, rtol=2e-7, atol=0)


@pytest.mark.parametrize("name", ["default", "yarn", "yarn_partial_betas"])
def test_rotated_q_and_k_match_apply_rotary_pos_emb(name: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = hf_config(name)
    rotary = Rotary.from_hf_config(config)
    d = rotary.rotary_dim
    q, k = draw(T=29, H=4, D=64), draw(T=29, H=2, D=64, seed=1)  # GQA: 4 query, 2 kv heads
    positions = torch.randint(0, 200, (2, 29), generator=torch.Generator().manual_seed(0))
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)
    # transformers works on [B, H, T, D] and rotates the first `d` dims (Phi-style partial).
    q_hf, k_hf = apply_rotary_pos_emb(
        q[..., :d].transpose(1, 2), k[..., :d].transpose(1, 2), cos, sin
    )
    # transformers computes the angles in float32 (error ~ position * 6e-8); attnkit in float64.
    torch.testing.assert_close(
        rotary(q, positions)[..., :d], q_hf.transpose(1, 2), atol=5e-5, rtol=0
    )
    torch.testing.assert_close(
        rotary(k, positions)[..., :d], k_hf.transpose(1, 2), atol=5e-5, rtol=0
    )
    assert torch.equal(rotary(q, positions)[..., d:], q[..., d:])


def test_from_hf_config_reads_old_style_and_nested_configs() -> None:
    old = types.SimpleNamespace(
        hidden_size=128, num_attention_heads=4, head_dim=None, rope_theta=1e6,
        partial_rotary_factor=0.5, max_position_embeddings=2048,
        rope_scaling={"type": "linear", "factor": 2.0},
    )  # fmt: skip
    rotary = Rotary.from_hf_config(old)
    assert rotary == Rotary(32, rotary_dim=16, base=1e6, scaling=LinearScaling(2.0))
    nested = types.SimpleNamespace(
        hidden_size=128, num_attention_heads=4, head_dim=64, max_position_embeddings=2048,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )  # fmt: skip
    with pytest.raises(ValueError, match="pass layer_type= to choose one"):
        Rotary.from_hf_config(nested)
    assert Rotary.from_hf_config(nested, layer_type="sliding_attention") == Rotary(64, base=1e4)
    with pytest.raises(ValueError, match="no rope parameters for layer type 'global'"):
        Rotary.from_hf_config(nested, layer_type="global")
    llama3 = types.SimpleNamespace(
        hidden_size=128, num_attention_heads=4, rope_parameters={"rope_type": "llama3"}
    )
    with pytest.raises(ValueError, match="rope type 'llama3' is not supported; supported: default"):
        Rotary.from_hf_config(llama3)


def test_scaling_table_names_every_scaling() -> None:
    assert set(positional.SCALINGS) == {"linear", "ntk", "dynamic", "yarn"}
    assert set(positional.HF_ROPE_TYPES) == {"default", "linear", "dynamic", "yarn"}
