"""Gated linear attention (Yang et al., 2024) and ViG's bidirectional form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from linear_helpers import check_forms, draw, qkv, split_run

from attnkit.linear import LinearState, gla, linear_attention
from attnkit.linear.chunked import (
    _chunks,
    _intra_vector,
    _intra_vector_secondary,
    _subchunk,
)


def gates(shape, dtype=torch.float32, strength=1.0, seed=3):
    return F.logsigmoid(draw(*shape, dtype=torch.float64, seed=seed) + 1.0).to(dtype) * strength


def inputs(dtype=torch.float32, T=45, per_dim=True, **sizes):
    x = qkv(T=T, dtype=dtype, **sizes)
    B, _, Hkv, Dk = x["k"].shape
    return x | {"log_gate": gates((B, T, Hkv, Dk if per_dim else 1), dtype)}


@pytest.mark.parametrize("per_dim, strength", [(True, 1.0), (False, 1.0), (True, 40.0)])
def test_forms_agree(per_dim: bool, strength: float) -> None:
    # Strength 40: chunks decay past e^-SAFE_SPAN, so the secondary chunking runs; there 17 is
    # prime (sub-chunks of one token), 20 has sub-chunks of 10, 64 covers T in one chunk.
    x = inputs(per_dim=per_dim)
    x["log_gate"] = x["log_gate"] * strength
    check_forms(gla, x, chunk_sizes=(17, 20, 64))


def test_both_intra_paths_agree() -> None:
    x = inputs(dtype=torch.float64)
    qc, kc, _, b = _chunks(x["q"].view(2, 45, 2, 2, 16), x["k"], x["v"], x["log_gate"], 16)
    torch.testing.assert_close(_intra_vector(qc, kc, b), _intra_vector_secondary(qc, kc, b))


def test_subchunk_sizes() -> None:
    assert [_subchunk(c) for c in (64, 20, 17, 7, 1)] == [16, 10, 1, 7, 1]


def test_strong_gates_stay_finite_in_float32() -> None:
    """Cumulative log-gates of -2000 over a chunk: every evaluated exponent stays <= 0."""
    x = inputs(dtype=torch.float64, T=70)
    x["log_gate"] = x["log_gate"] * 40 - 1.0
    exact = gla(**x, form="recurrent")
    got = gla(**{n: t.float() for n, t in x.items()}, chunk_size=64)
    assert torch.isfinite(got).all()
    assert (got.double() - exact).abs().max() < 1e-4 * exact.abs().max()


def test_initial_state() -> None:
    x = inputs(T=30) | {"kv0": draw(2, 2, 16, 16)}

    def fn(q, k, v, log_gate, kv0, form, chunk_size):
        return gla(
            q, k, v, log_gate, initial_state=LinearState(kv0), form=form, chunk_size=chunk_size
        )

    check_forms(fn, x, chunk_sizes=(8,))


def test_state_passing() -> None:
    split_run(gla, inputs(dtype=torch.float64, T=41), cut=23, chunk_size=16)


def test_gates_one_is_linear_attention() -> None:
    x = inputs(dtype=torch.float64)
    x["log_gate"] = torch.zeros_like(x["log_gate"])
    plain = linear_attention(x["q"], x["k"], x["v"], feature_map="identity", normalize=False)
    torch.testing.assert_close(gla(**x, scale=1.0), plain)


def test_bidirectional_is_forward_plus_reversed_scan() -> None:
    x = inputs(dtype=torch.float64)
    back = gates(x["log_gate"].shape, torch.float64, seed=9)
    got = gla(**x, causal=False, backward_log_gate=back, chunk_size=8)
    forward = gla(**x)
    flipped = {n: t.flip(1) for n, t in x.items() if n != "log_gate"}
    reverse = gla(**flipped, log_gate=back.flip(1)).flip(1)
    torch.testing.assert_close(got, forward + reverse)
    check_forms(lambda **y: gla(**y, causal=False), inputs(), chunk_sizes=(16,))


def test_bfloat16_forward() -> None:
    check_forms(gla, inputs(torch.bfloat16), chunk_sizes=(16,), grads=False)


def test_errors() -> None:
    x = inputs()
    with pytest.raises(ValueError, match=r"finite and <= 0"):
        gla(**(x | {"log_gate": -x["log_gate"]}))
    with pytest.raises(ValueError, match=r"log-gate must be \[B, T, Hkv, 1 or Dk\]"):
        gla(**(x | {"log_gate": x["log_gate"][..., :3]}))
    with pytest.raises(ValueError, match="backward_log_gate is for causal=False"):
        gla(**x, backward_log_gate=x["log_gate"])
    with pytest.raises(ValueError, match="bidirectional GLA sees the whole sequence"):
        gla(**x, causal=False, return_state=True)
