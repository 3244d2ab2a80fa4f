"""The LSE merge: attention over key pieces merges into attention over all keys, exactly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

import attnkit
from attnkit import masks
from attnkit.testing import CASES

Tq, Tk = 17, 37


def whole_and_log_weights() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Whole attention (reference, with lse) and the float64 log-weights ``[B, H, Tq, Tk]`` and
    values ``[B, H, Tk, Dv]`` the pieces are computed from. Batch 1 sees only 20 keys, so some
    pieces are fully masked for it; the causal mask masks later pieces for early queries."""
    case = CASES["cross_17x65_b2"]
    q, k, v = case.make(torch.float64, requires_grad=False)
    q, k, v = q[:, :Tq], k[:, :Tk], v[:, :Tk]
    mask = masks.causal() & masks.key_padding(torch.tensor([Tk, 20]))
    out, aux = attnkit.attention(q, k, v, mask=mask, backend="reference", aux=attnkit.Aux(lse=True))
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    log_weights = s.masked_fill(~mask.dense(Tq, Tk), float("-inf"))
    return out, aux.lse, log_weights, v.transpose(1, 2)


def piece(log_weights: Tensor, v: Tensor, keys: slice) -> tuple[Tensor, Tensor]:
    """Softmax attention over one slice of keys: ``(out [B, Tq, H, Dv], lse [B, Tq, H])``,
    out = 0 and lse = -inf for rows that see no key of the slice (or an empty slice)."""
    lw, vv = log_weights[..., keys], v[:, :, keys]
    lse = torch.logsumexp(lw, dim=-1)
    weights = torch.exp(lw - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    return (weights @ vv).transpose(1, 2), lse.transpose(1, 2)


SPLITS = {
    "two": [0, 20, Tk],
    "five_with_empty_piece": [0, 0, 7, 20, 30, Tk],  # [0:0] is empty; [20:] masked for b=1
    "five_uneven": [0, 1, 2, 35, 36, Tk],
}


def pieces_of(split: str, log_weights: Tensor, v: Tensor) -> list[tuple[Tensor, Tensor]]:
    return [piece(log_weights, v, slice(a, b)) for a, b in itertools.pairwise(SPLITS[split])]


def test_the_splits_contain_empty_and_masked_pieces() -> None:
    _, _, log_weights, v = whole_and_log_weights()
    empty, _, _, masked_for_b1, _ = pieces_of("five_with_empty_piece", log_weights, v)
    assert torch.isneginf(empty[1]).all() and torch.equal(empty[0], torch.zeros_like(empty[0]))
    assert torch.isneginf(masked_for_b1[1][1]).all() and torch.isfinite(masked_for_b1[1][0]).any()


@pytest.mark.parametrize("split", SPLITS)
def test_merge_all_of_pieces_equals_whole_attention(split: str) -> None:
    out, lse, log_weights, v = whole_and_log_weights()
    pieces = pieces_of(split, log_weights, v)
    merged_out, merged_lse = attnkit.merge_all([p[0] for p in pieces], [p[1] for p in pieces])
    torch.testing.assert_close(merged_out, out)
    torch.testing.assert_close(merged_lse, lse.double())


@pytest.mark.parametrize("split", SPLITS)
def test_pairwise_merge_in_any_order_equals_whole_attention(split: str) -> None:
    out, lse, log_weights, v = whole_and_log_weights()
    pieces = pieces_of(split, log_weights, v)
    left_to_right = pieces[0]
    for p in pieces[1:]:
        left_to_right = attnkit.merge(*left_to_right, *p)
    right_to_left = pieces[-1]
    for p in reversed(pieces[:-1]):
        right_to_left = attnkit.merge(*p, *right_to_left)
    for merged_out, merged_lse in (left_to_right, right_to_left):
        torch.testing.assert_close(merged_out, out)
        torch.testing.assert_close(merged_lse, lse.double())


def test_fully_masked_piece_contributes_nothing() -> None:
    out, lse, log_weights, v = whole_and_log_weights()
    masked = torch.full_like(log_weights, float("-inf"))
    empty_out, empty_lse = piece(masked, v, slice(None))
    assert torch.isneginf(empty_lse).all() and torch.equal(empty_out, torch.zeros_like(out))
    whole = piece(log_weights, v, slice(None))
    merged_out, merged_lse = attnkit.merge(*whole, empty_out, empty_lse)
    torch.testing.assert_close(merged_out, out)
    torch.testing.assert_close(merged_lse, lse.double())


def test_all_pieces_empty_give_zero_and_minus_infinity() -> None:
    B, H, Dv = 2, 3, 5
    outs = [torch.zeros(B, Tq, H, Dv) for _ in range(3)]
    lses = [torch.full((B, Tq, H), float("-inf")) for _ in range(3)]
    out, lse = attnkit.merge_all(outs, lses)
    assert torch.equal(out, torch.zeros(B, Tq, H, Dv))
    assert torch.isneginf(lse).all()
    out2, lse2 = attnkit.merge(outs[0], lses[0], outs[1], lses[1])
    assert torch.equal(out2, torch.zeros(B, Tq, H, Dv))
    assert torch.isneginf(lse2).all()


def test_merge_keeps_the_output_dtype_and_large_lse_is_stable() -> None:
    out_a, out_b = torch.ones(1, 2, 1, 4, dtype=torch.bfloat16), torch.zeros(1, 2, 1, 4)
    lse_a = torch.tensor([[[1000.0], [-1000.0]]])
    lse_b = torch.tensor([[[1000.0], [-1000.0 + math.log(3.0)]]])
    out, lse = attnkit.merge(out_a, lse_a, out_b.bfloat16(), lse_b)
    assert out.dtype == torch.bfloat16
    assert attnkit.merge(out_a.float(), lse_a, out_b.double(), lse_b)[0].dtype == torch.float64
    torch.testing.assert_close(out[0, 0, 0].float(), torch.full((4,), 0.5))
    torch.testing.assert_close(out[0, 1, 0].float(), torch.full((4,), 0.25))
    torch.testing.assert_close(
        lse[0, :, 0], torch.tensor([1000.0 + math.log(2.0), -1000.0 + math.log(4.0)])
    )


def test_merge_all_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="one lse per output"):
        attnkit.merge_all([torch.zeros(1, 1)], [])
    with pytest.raises(ValueError, match="at least one piece"):
        attnkit.merge_all([], [])
