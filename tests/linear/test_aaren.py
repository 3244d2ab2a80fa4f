"""Aaren ("Attention as an RNN", Feng et al., 2024): exact softmax attention over prefixes."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import check_forms, draw, qkv, split_run

import attnkit
from attnkit import masks
from attnkit.linear import PrefixState, aaren, prefix, prefix_scan
from attnkit.merge import merge


def query(x, seed=7):
    _, _, Hq, D = x["q"].shape
    return draw(1, 1, Hq, D, dtype=x["q"].dtype, seed=seed) * 2.0


@pytest.mark.parametrize("chunk_size", [1, 6, 64])
@pytest.mark.parametrize("form", ["reference", "chunked", "recurrent"])
def test_equals_causal_softmax_attention(form: str, chunk_size: int) -> None:
    x = qkv(dtype=torch.float64)
    q = query(x)
    expected = attnkit.attention(q.expand_as(x["q"]), x["k"], x["v"], mask=masks.causal())
    got = aaren(q, x["k"], x["v"], form=form, chunk_size=chunk_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_forms_forward_and_backward() -> None:
    x = qkv(T=50)
    x["q"] = query(x)
    check_forms(aaren, x, chunk_sizes=(1, 7, 16))


def test_large_scores_stay_exact_in_float32() -> None:
    """Scores spread over hundreds: the running log-sum-exp keeps every exponent <= 0."""
    x = qkv(T=60, dtype=torch.float64)
    x["q"] = query(x) * 40
    exact = aaren(**x, form="reference")
    got = aaren(**{n: t.float() for n, t in x.items()}, chunk_size=16)
    assert torch.isfinite(got).all()
    assert (got.double() - exact).abs().max() < 1e-4 * exact.abs().max()


def test_state_passing() -> None:
    x = qkv(T=39, dtype=torch.float64)
    q = query(x)
    split_run(lambda **y: aaren(q, **y), {"k": x["k"], "v": x["v"]}, cut=17, chunk_size=5)


def test_initial_state_is_a_prefix() -> None:
    """A state (out, lse) over earlier keys enters exactly like those keys."""
    x = qkv(T=30, dtype=torch.float64)
    q = query(x)
    full = aaren(q, x["k"], x["v"])
    _, state = aaren(q, x["k"][:, :12], x["v"][:, :12], return_state=True)
    assert isinstance(state, PrefixState) and state.lse.shape == (2, 1, 4)
    for form in ("reference", "chunked", "recurrent"):
        rest = aaren(q, x["k"][:, 12:], x["v"][:, 12:], initial_state=state, form=form)
        torch.testing.assert_close(rest, full[:, 12:])


def test_prefix_scan_is_the_sequential_merge() -> None:
    out, lse = draw(3, 11, 5, dtype=torch.float64), draw(3, 11, dtype=torch.float64, seed=2)
    scanned_out, scanned_lse = prefix_scan(out, lse)
    acc_out, acc_lse = out[:, 0], lse[:, 0]
    for t in range(1, 11):
        acc_out, acc_lse = merge(acc_out, acc_lse, out[:, t], lse[:, t])
        torch.testing.assert_close(scanned_out[:, t], acc_out)
        torch.testing.assert_close(scanned_lse[:, t], acc_lse)


def test_bfloat16_forward() -> None:
    x = qkv(dtype=torch.bfloat16)
    x["q"] = query(x)
    check_forms(aaren, x, chunk_sizes=(16,), grads=False)


def test_errors() -> None:
    x = qkv()
    with pytest.raises(ValueError, match=r"q must be \[B, 1, Hq, D\]"):
        aaren(**x)
    q = query(x)
    with pytest.raises(ValueError, match="initial_state has out"):
        aaren(
            q,
            x["k"],
            x["v"],
            initial_state=PrefixState(torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4)),
        )
    with pytest.raises(ValueError, match="unknown form"):
        aaren(q, x["k"], x["v"], form="scan")


def test_factored_and_per_pair_chunk_weights_agree(monkeypatch) -> None:
    """The in-chunk weights as a product of two factors (moderate scores) and pair by pair
    (forced here; taken for scores that jump by more than e^60) are the same numbers."""
    x = qkv(T=70, dtype=torch.float64)
    q = query(x)
    factored = aaren(q, x["k"], x["v"], chunk_size=16)
    monkeypatch.setattr(prefix, "SAFE_SPAN", float("-inf"))
    per_pair = aaren(q, x["k"], x["v"], chunk_size=16)
    torch.testing.assert_close(factored, per_pair, rtol=0, atol=1e-12)
