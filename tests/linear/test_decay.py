"""Lightning Attention-2 and RetNet retention: one decayed core, two entry points."""

from __future__ import annotations

import math

import pytest
import torch
from linear_helpers import check_forms, draw, qkv, split_run

from attnkit.linear import LinearState, lightning_attention, linear_attention, retention
from attnkit.linear.decay import lightning_decay, retnet_decay
from attnkit.positional import alibi_slopes


def decayed_quadratic(q, k, v, decay, scale):
    """``(Q K^T * D) V`` with ``D_nm = decay_h^(n-m)`` for ``n >= m``, in float64 from scratch
    (query head h reads key head h // G and its decay)."""
    G = q.shape[2] // k.shape[2]
    kk, vv = k.double().repeat_interleave(G, 2), v.double().repeat_interleave(G, 2)
    lam = decay.double().repeat_interleave(G)
    n = torch.arange(q.shape[1], dtype=torch.float64)
    distance = n[:, None] - n[None, :]
    D = torch.where(distance >= 0, lam[:, None, None] ** distance.clamp(min=0), 0.0)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), kk) * scale * D
    return torch.einsum("bhij,bjhe->bihe", scores, vv)


def test_default_decays() -> None:
    torch.testing.assert_close(lightning_decay(4), torch.exp(-alibi_slopes(4).double()))
    torch.testing.assert_close(
        retnet_decay(3), torch.tensor([1 - 2**-5, 1 - 2**-6, 1 - 2**-7], dtype=torch.float64)
    )


def test_match_the_papers_quadratic_forms() -> None:
    x = qkv(dtype=torch.float64)
    expected = decayed_quadratic(**x, decay=lightning_decay(2), scale=1.0)
    torch.testing.assert_close(lightning_attention(**x, chunk_size=7), expected)
    expected = decayed_quadratic(**x, decay=retnet_decay(2), scale=1 / math.sqrt(16))
    torch.testing.assert_close(retention(**x, chunk_size=7), expected)


@pytest.mark.parametrize("fn", [lightning_attention, retention])
def test_forms_agree(fn) -> None:
    check_forms(fn, qkv(), chunk_sizes=(1, 7, 64))


def test_strong_decay_with_initial_state() -> None:
    inputs = qkv(T=40) | {"kv0": draw(2, 2, 16, 16)}

    def fn(q, k, v, kv0, form, chunk_size):
        return retention(
            q,
            k,
            v,
            gamma=torch.tensor([0.5, 0.9]),
            initial_state=LinearState(kv0),
            form=form,
            chunk_size=chunk_size,
        )

    check_forms(fn, inputs, chunk_sizes=(6, 32))


@pytest.mark.parametrize("fn", [lightning_attention, retention])
def test_state_passing(fn) -> None:
    split_run(fn, qkv(T=37, dtype=torch.float64), cut=15, chunk_size=4)


def test_decay_one_is_linear_attention() -> None:
    x = qkv(dtype=torch.float64)
    plain = linear_attention(**x, feature_map="identity", normalize=False)
    torch.testing.assert_close(lightning_attention(**x, decay=1.0), plain)
    torch.testing.assert_close(retention(**x, gamma=1.0, scale=1.0), plain)


def test_bfloat16_forward() -> None:
    check_forms(lightning_attention, qkv(dtype=torch.bfloat16), chunk_sizes=(16,), grads=False)


def test_errors() -> None:
    x = qkv()
    with pytest.raises(ValueError, match=r"decays must lie in \(0, 1\]"):
        lightning_attention(**x, decay=1.5)
    with pytest.raises(ValueError, match=r"decays must lie in \(0, 1\]"):
        retention(**x, gamma=torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="one value per key/value head"):
        retention(**x, gamma=torch.tensor([0.5, 0.5, 0.5]))
