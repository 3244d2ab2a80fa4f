"""Music Transformer relative attention: the skew equals the explicit gather (forward and
backward), the attention equals the dense formula, and it reduces to causal attention."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.positional import (
    relative_attention,
    relative_attention_reference,
    relative_logits,
    relative_logits_gather,
)
from attnkit.testing import CASES, check_function

# (case, L): L = number of distance embeddings; L < Tk exercises clipping.
SHAPES = [("self_odd_63", 63), ("cross_17x65_b2", 80), ("gqa_8_2", 20), ("decode_1x70", 70)]


def embeddings(H: int | None, L: int, D: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    shape = (L, D) if H is None else (H, L, D)
    return (torch.randn(*shape, generator=g) * 0.5 + 0.1).to(dtype)


def test_skew_puts_each_distance_in_place() -> None:
    """``S_rel[b, h, i, j] = q_i · e_(pos_i - j)`` written as a loop over pairs."""
    B, Tq, Tk, H, D, L = 2, 5, 9, 3, 4, 6
    q = torch.randn(B, Tq, H, D, dtype=torch.float64)
    rel = torch.randn(H, L, D, dtype=torch.float64)
    S = relative_logits(q, rel, Tk)
    assert S.shape == (B, H, Tq, Tk)
    for i in range(Tq):
        position = i + Tk - Tq
        for j in range(Tk):
            if j > position:
                assert (S[:, :, i, j] == 0).all()
                continue
            e = rel[:, min(position - j, L - 1)]  # [H, D]
            torch.testing.assert_close(S[:, :, i, j], torch.einsum("bhd,hd->bh", q[:, i], e))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
@pytest.mark.parametrize(("case", "L"), SHAPES)
def test_skew_equals_gather_forward_and_backward(case: str, L: int, shared: bool) -> None:
    q, k, _ = CASES[case].make(requires_grad=False)
    rel = embeddings(None if shared else q.shape[2], L, q.shape[-1])
    Tk = k.shape[1]
    check_function(
        lambda q, rel_emb: relative_logits(q, rel_emb, Tk),
        lambda q, rel_emb: relative_logits_gather(q, rel_emb, Tk),
        {"q": q, "rel_emb": rel},
    ).assert_ok()


@pytest.mark.parametrize(
    ("case", "L", "shared", "dtype"),
    [
        ("self_odd_63", 63, False, torch.float32),
        ("cross_17x65_b2", 30, True, torch.float32),
        ("gqa_8_2", 48, False, torch.float32),
        ("value_dim_48", 37, True, torch.float32),
        ("decode_1x70", 70, False, torch.float32),
        ("mqa_b2", 33, False, torch.bfloat16),
    ],
)
def test_attention_matches_the_dense_formula(case, L, shared, dtype) -> None:
    q, k, v = CASES[case].make(dtype, requires_grad=False)
    rel = embeddings(None if shared else q.shape[2], L, q.shape[-1], dtype)
    check_function(
        relative_attention,
        relative_attention_reference,
        {"q": q, "k": k, "v": v, "rel_emb": rel},
    ).assert_ok()


def test_zero_embeddings_give_causal_attention() -> None:
    q, k, v = CASES["cross_17x65_b2"].make(requires_grad=False)
    out = relative_attention(q, k, v, torch.zeros(65, 32))
    expected = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference")
    torch.testing.assert_close(out, expected)


def test_scale_applies_to_both_terms() -> None:
    q, k, v = CASES["self_odd_63"].make(torch.float64, requires_grad=False)
    rel = embeddings(4, 63, 32, torch.float64)
    got = relative_attention(q, k, v, rel, scale=0.3)
    expected = relative_attention_reference(q, k, v, rel, scale=0.3)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, relative_attention(q, k, v, rel))


def test_rejects_bad_shapes() -> None:
    q, k, v = CASES["cross_17x65_b2"].make(requires_grad=False)
    with pytest.raises(ValueError, match=r"Tq \(65\) must be <= Tk \(17\)"):
        relative_attention(k, q, q, torch.zeros(10, 32))
    with pytest.raises(ValueError, match=r"rel_emb must be \[L, D\] \(shared\) or \[H, L, D\]"):
        relative_attention(q, k, v, torch.zeros(10, 16))
    with pytest.raises(ValueError, match="rel_emb has 3 heads but q has 4"):
        relative_attention(q, k, v, torch.zeros(3, 10, 32))
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        relative_attention(q, k[:, :, :3], v[:, :, :3], torch.zeros(10, 32))
