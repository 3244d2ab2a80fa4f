"""FLARE (Puri et al., 2025): low-rank routing through latent queries; its causal form."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import check_forms, draw, qkv, split_run

import attnkit
from attnkit.linear import aaren, flare
from attnkit.testing import check_function


def inputs(M=5, dtype=torch.float32, T=45):
    x = qkv(T=T, Hq=2, Hkv=2, dtype=dtype)
    return {"q": draw(1, M, 2, 16, dtype=dtype, seed=4) * 0.5, "k": x["k"], "v": x["v"]}


def test_encoder_two_attentions_equal_the_dense_low_rank_matrix() -> None:
    x = inputs()
    check_function(lambda **y: flare(**y), lambda **y: flare(**y, form="reference"), x).assert_ok()


def test_one_latent_gives_every_token_its_gather() -> None:
    """With M = 1 the readout softmax is 1: every token gets softmax(q_L K^T) V."""
    x = inputs(M=1, dtype=torch.float64)
    gathered = attnkit.attention(x["q"].expand(2, -1, -1, -1), x["k"], x["v"], scale=1.0)
    torch.testing.assert_close(flare(**x), gathered.expand_as(flare(**x)))


def test_causal_forms_agree() -> None:
    check_forms(lambda **y: flare(**y, causal=True), inputs(), chunk_sizes=(1, 8, 64))


def test_causal_one_latent_is_aaren() -> None:
    x = inputs(M=1, dtype=torch.float64)
    torch.testing.assert_close(flare(**x, causal=True), aaren(**x, scale=1.0))


def test_causal_state_passing() -> None:
    x = inputs(dtype=torch.float64, T=37)
    latents = x.pop("q")
    split_run(lambda **y: flare(latents, **y, causal=True), x, cut=20, chunk_size=6)


def test_bfloat16_forward() -> None:
    check_forms(
        lambda **y: flare(**y, causal=True),
        inputs(dtype=torch.bfloat16),
        chunk_sizes=(16,),
        grads=False,
    )


def test_errors() -> None:
    x = inputs()
    with pytest.raises(ValueError, match="latents and keys need the same heads"):
        flare(draw(1, 5, 4, 16), x["k"], x["v"])
    with pytest.raises(ValueError, match=r"unknown form of non-causal FLARE .* 'recurrent'"):
        flare(**x, form="recurrent")
    with pytest.raises(ValueError, match="non-causal FLARE sees the whole sequence"):
        flare(**x, return_state=True)
