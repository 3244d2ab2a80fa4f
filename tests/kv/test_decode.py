"""Split-KV decoding equals single-piece decoding, forward and backward."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks, scores, testing
from attnkit.kv.decode import split_kv_attention, split_points


@pytest.mark.parametrize(
    ("Tq", "Tk", "Hq", "Hkv", "splits"),
    [(1, 70, 8, 2, 4), (1, 1025, 4, 1, 7), (1, 33, 4, 4, 33), (2, 63, 6, 3, 3)],
)
def test_split_kv_equals_single_piece_decode(Tq: int, Tk: int, Hq: int, Hkv: int, splits) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, Tq, Hq, 32, generator=g)
    k = torch.randn(2, Tk, Hkv, 32, generator=g) + 0.5  # asymmetric inputs
    v = torch.randn(2, Tk, Hkv, 24, generator=g)
    out, lse = split_kv_attention(q, k, v, num_splits=splits)
    want, aux = attnkit.attention(q, k, v, aux=attnkit.Aux(lse=True))
    torch.testing.assert_close(out, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse, aux.lse, rtol=0, atol=2e-6)
    single, _ = split_kv_attention(q, k, v, num_splits=1)
    torch.testing.assert_close(single, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_split_kv_forward_and_backward_under_the_two_x_rule(causal: bool) -> None:
    torch.manual_seed(1)
    Tq = 5 if causal else 1
    q, k, v = torch.randn(2, Tq, 8, 32), torch.randn(2, 70, 2, 32), torch.randn(2, 70, 2, 32)
    mask = masks.causal() if causal else None

    def fn(q, k, v, mask=None):
        return split_kv_attention(q, k, v, num_splits=3, causal=causal)[0]

    testing.check_against_reference(fn, q, k, v, mask=mask).assert_ok()


def test_bf16_split_kv_stays_close_to_the_float64_golden() -> None:
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, n, h, 64) for n, h in ((1, 9), (500, 3), (500, 3)))
    golden = attnkit.attention(q.double(), k.double(), v.double())
    ref = attnkit.attention(*(t.bfloat16() for t in (q, k, v)))
    out, _ = split_kv_attention(*(t.bfloat16() for t in (q, k, v)), num_splits=5)
    assert out.dtype == torch.bfloat16
    assert (out.double() - golden).abs().max() <= 2 * (ref.double() - golden).abs().max() + 1e-3


def test_split_points_are_balanced_and_keep_the_causal_tail() -> None:
    assert split_points(10, 3) == [0, 3, 6, 10]
    assert split_points(10, 20) == [0, *range(1, 11)]
    bounds = split_points(10, 4, last_at_least=4)
    assert bounds[-1] - bounds[-2] >= 4 and len(bounds) == 3


def test_split_kv_errors() -> None:
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        split_kv_attention(q, k, k, causal=True)
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        split_kv_attention(q, k, k, num_splits=0)
    with pytest.raises(ValueError, match="not normalised"):
        split_kv_attention(q, k, k, score=scores.sigmoid())
