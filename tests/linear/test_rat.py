"""RAT (Wei et al., 2025): recurrence within chunks, softmax attention across them."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import check_forms, draw, qkv, split_run

import attnkit
from attnkit import masks
from attnkit.linear import RATState, rat


def inputs(dtype=torch.float32, T=45, Dv=None):
    x = qkv(T=T, dtype=dtype, Dv=Dv)
    return x | {"gate": torch.sigmoid(draw(*x["k"].shape, dtype=dtype, seed=3) + 1.0)}


def test_chunk_of_one_with_open_gates_is_causal_softmax_attention() -> None:
    x = inputs(dtype=torch.float64)
    x["gate"] = torch.zeros_like(x["gate"])
    expected = attnkit.attention(x["q"], x["k"], x["v"], mask=masks.causal())
    for form in ("reference", "chunked", "recurrent"):
        torch.testing.assert_close(rat(**x, chunk_size=1, form=form), expected)


def at(model_chunk: int):
    """RAT at a fixed chunk size for ``check_forms``: RAT's chunk size is part of the model,
    so the execution chunk size ``check_forms`` passes is ignored."""
    return lambda form, chunk_size, **y: rat(**y, form=form, chunk_size=model_chunk)


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_forms_agree(chunk_size: int) -> None:
    check_forms(at(chunk_size), inputs(), chunk_sizes=(chunk_size,))


def test_separate_value_gate() -> None:
    x = inputs(Dv=8) | {"value_gate": torch.sigmoid(draw(2, 45, 2, 8, seed=4))}
    check_forms(at(5), x, chunk_sizes=(5,))


@pytest.mark.parametrize("cut", [12, 17])  # at a chunk boundary, inside a chunk
def test_state_passing(cut: int) -> None:
    split_run(lambda **y: rat(**y, chunk_size=4), inputs(dtype=torch.float64, T=38), cut=cut)


def test_state_holds_one_summary_per_finished_chunk() -> None:
    _, state = rat(**inputs(T=45), chunk_size=16, return_state=True)
    assert isinstance(state, RATState)
    assert state.keys.shape == (2, 2, 2, 16) and state.length == 45
    _, state = rat(**inputs(T=32), chunk_size=16, return_state=True)
    assert state.running_k.abs().max() == 0


def test_bfloat16_forward() -> None:
    check_forms(at(8), inputs(torch.bfloat16), chunk_sizes=(8,), grads=False)


def test_errors() -> None:
    x = inputs()
    with pytest.raises(ValueError, match=r"gate values must lie in \[0, 1\]"):
        rat(**(x | {"gate": x["gate"] + 1}))
    with pytest.raises(ValueError, match=r"gate values must lie in \[0, 1\]"):
        rat(**(x | {"gate": x["gate"].index_fill(1, torch.tensor([2]), float("nan"))}))
    with pytest.raises(ValueError, match="one shared gate needs Dv == Dk"):
        rat(**inputs(Dv=8))
    _, state = rat(**x, chunk_size=4, return_state=True)
    with pytest.raises(ValueError, match="with chunk_size=8 it must be"):
        rat(**x, chunk_size=8, initial_state=state)
