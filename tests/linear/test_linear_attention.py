"""Linear attention (Katharopoulos et al., 2020): every form, feature map and state."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import check_forms, draw, qkv, split_run

from attnkit.linear import LinearState, linear_attention
from attnkit.testing import check_function


@pytest.mark.parametrize(
    "feature_map, normalize", [("elu", True), ("relu", True), ("identity", False)]
)
@pytest.mark.parametrize("causal", [True, False])
def test_forms_agree(feature_map: str, normalize: bool, causal: bool) -> None:
    def fn(**x):
        return linear_attention(**x, feature_map=feature_map, normalize=normalize, causal=causal)

    check_forms(fn, qkv(), chunk_sizes=(7, 64) if causal else (16,))


def test_initial_state_forward_and_backward() -> None:
    inputs = qkv(T=33, D=8, Dv=12) | {
        "kv0": draw(2, 2, 8, 12).abs(),
        "z0": draw(2, 2, 8, seed=2).abs() + 1.0,
    }

    def fn(q, k, v, kv0, z0, form, chunk_size):
        state = LinearState(kv0, z0)
        return linear_attention(q, k, v, initial_state=state, form=form, chunk_size=chunk_size)

    check_forms(fn, inputs, chunk_sizes=(5, 16))


@pytest.mark.parametrize("causal", [True, False])
def test_state_passing(causal: bool) -> None:
    sequence = qkv(T=41, dtype=torch.float64)
    if causal:
        split_run(linear_attention, sequence, cut=19, chunk_size=8)
        return
    # Non-causal: the state after a segment is its key/value sum, carried into the next call.
    _, state = linear_attention(**sequence, causal=False, return_state=True)
    half = {n: t[:, :20] for n, t in sequence.items()}
    _, first = linear_attention(**half, causal=False, return_state=True)
    rest = {n: t[:, 20:] for n, t in sequence.items()}
    _, both = linear_attention(**rest, causal=False, initial_state=first, return_state=True)
    torch.testing.assert_close(both.kv, state.kv)
    torch.testing.assert_close(both.z, state.z)


def test_identity_unnormalised_is_masked_quadratic_product() -> None:
    """``((Q K^T) * M) V`` with query head h reading key head h // G: exact reduction."""
    x = qkv(dtype=torch.float64)
    q, k, v = x["q"], x["k"], x["v"]
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kk).tril()
    expected = torch.einsum("bhij,bjhe->bihe", scores, vv)
    got = linear_attention(q, k, v, feature_map="identity", normalize=False, chunk_size=7)
    torch.testing.assert_close(got, expected)


def test_bfloat16_forward() -> None:
    check_forms(linear_attention, qkv(dtype=torch.bfloat16), chunk_sizes=(16,), grads=False)


def test_paper_formula() -> None:
    """phi(q_i) sum_(j<=i) phi(k_j)^T v_j / phi(q_i) . sum_(j<=i) phi(k_j), from scratch."""
    x = qkv(Hq=2, Hkv=2, dtype=torch.float64)
    phi = {name: torch.nn.functional.elu(x[name]) + 1 for name in ("q", "k")}
    S = torch.cumsum(torch.einsum("bthd,bthe->bthde", phi["k"], x["v"]), dim=1)
    z = torch.cumsum(phi["k"], dim=1)
    num = torch.einsum("bthd,bthde->bthe", phi["q"], S)
    den = torch.einsum("bthd,bthd->bth", phi["q"], z).unsqueeze(-1) + 1e-6
    torch.testing.assert_close(linear_attention(**x, chunk_size=16), num / den)
    check_function(
        lambda **y: linear_attention(**y),
        lambda **y: linear_attention(**y, form="recurrent"),
        x,
        grads=False,
    ).assert_ok()


def test_errors() -> None:
    x = qkv()
    with pytest.raises(ValueError, match="unknown feature_map 'softplus'"):
        linear_attention(**x, feature_map="softplus")
    with pytest.raises(ValueError, match="normalize=False or a non-negative map"):
        linear_attention(**x, feature_map="identity")
    with pytest.raises(ValueError, match="unknown form 'parallel'"):
        linear_attention(**x, form="parallel")
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        linear_attention(**x, chunk_size=0)
    with pytest.raises(ValueError, match="Hq must be a multiple of Hkv"):
        linear_attention(x["q"][:, :, :3], x["k"], x["v"])
    with pytest.raises(ValueError, match=r"initial_state.kv is \(2, 2, 16, 8\)"):
        linear_attention(**x, initial_state=LinearState(torch.zeros(2, 2, 16, 8)))
    with pytest.raises(ValueError, match="z must be given exactly when"):
        linear_attention(**x, initial_state=LinearState(torch.zeros(2, 2, 16, 16)))
    with pytest.raises(TypeError, match="must be a LinearState"):
        linear_attention(**x, initial_state=torch.zeros(2, 2, 16, 16))
    with pytest.raises(ValueError, match="self-attention over one sequence"):
        linear_attention(x["q"][:, :5], x["k"], x["v"])
