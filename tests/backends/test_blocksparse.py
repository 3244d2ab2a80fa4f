"""The block-sparse backend: both exp paths, many runs per row, per-head masks, refusals."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnkit
from attnkit import masks, positional, scores
from attnkit.backends import blocksparse
from attnkit.call import AttentionCall
from attnkit.testing import check_against_reference

run = partial(attnkit.attention, backend="blocksparse")


def inputs(T: int, q_scale: float = 1.0, dtype=torch.float32, Tq: int | None = None):
    g = torch.Generator().manual_seed(T)
    Tq = T if Tq is None else Tq
    q = torch.randn(2, Tq, 4, 16, generator=g) * q_scale
    k, v = (torch.randn(2, T, 2, 16, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


LONG_MASKS = {
    "dense": lambda: None,
    "causal": masks.causal,
    "window": lambda: masks.sliding_window(150),
    "sinks_window": lambda: masks.sinks(4) | masks.sliding_window(100),
    "documents": lambda: (
        masks.documents(torch.tensor([[0] * 200 + [1] * 300 + [2] * 200, [0] * 500 + [1] * 200]))
        & masks.causal()
    ),
    "empty_rows": lambda: masks.causal() & masks.key_padding(torch.tensor([500, 0])),
}


@pytest.mark.parametrize("q_scale", [1.0, 20.0], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("name", LONG_MASKS)
def test_long_rows_with_many_runs_forward_and_backward(name: str, q_scale: float) -> None:
    q, k, v = inputs(700, q_scale)  # 3 query blocks, rows of up to 2 runs of 4 tiles
    mask = LONG_MASKS[name]()
    assert blocksparse.needs_shift(AttentionCall(q, k, v, mask=mask)) == (q_scale > 1)
    check_against_reference(run, q, k, v, mask=mask).assert_ok()


def test_bfloat16_and_decoding() -> None:
    q, k, v = inputs(700, dtype=torch.bfloat16)
    check_against_reference(run, q, k, v, mask=masks.causal()).assert_ok()
    q, k, v = inputs(700, Tq=3)
    check_against_reference(run, q, k, v, mask=masks.causal()).assert_ok()


def test_float16_is_exact_through_the_shifted_path() -> None:
    q, k, v = inputs(300, dtype=torch.float16)
    assert blocksparse.needs_shift(AttentionCall(q, k, v))
    check_against_reference(run, q, k, v, mask=masks.causal()).assert_ok()


def test_per_head_masks() -> None:
    q, k, v = inputs(300)
    heads = torch.stack([masks.sliding_window(w).dense(300, 300)[0, 0] for w in (3, 40, 299, 0)])
    mask = masks.from_dense(heads[None])
    check_against_reference(run, q, k, v, mask=mask).assert_ok()


def test_scores_far_below_the_row_max_still_count() -> None:
    # The exp argument is clamped at -80 for speed; weights below e^-80 are below float32
    # rounding of the row sum, so the result must still match the reference.
    q, k, v = inputs(400, q_scale=60.0)
    check_against_reference(run, q, k, v, mask=masks.causal()).assert_ok()


def test_lse_is_returned() -> None:
    q, k, v = inputs(300)
    _, extra = run(q, k, v, mask=masks.causal(), aux=attnkit.Aux(lse=True))
    _, expected = attnkit.attention(
        q, k, v, mask=masks.causal(), backend="reference", aux=attnkit.Aux(lse=True)
    )
    torch.testing.assert_close(extra.lse, expected.lse, atol=1e-5, rtol=1e-5)


def test_refusals_name_the_alternative() -> None:
    q, k, v = inputs(64)
    for options, expected in (
        ({"score": scores.sigmoid()}, "plain softmax only"),
        ({"score": scores.softcap(5.0)}, "plain softmax only"),
        ({"bias": positional.alibi(4)}, "no additive bias"),
    ):
        reason = blocksparse.BACKEND.supports(AttentionCall(q, k, v, **options))
        assert reason is not None and expected in reason


def test_auto_prefers_it_where_measured_faster() -> None:
    long = torch.randn(1, 4096, 4, 64)
    window = masks.sliding_window(255)
    half = long.bfloat16()
    assert attnkit.explain(half, half, half, mask=window).chosen == "blocksparse"
    assert attnkit.explain(half, half, half, mask=masks.causal()).chosen == "blocksparse"
    assert attnkit.explain(half, half, half).chosen == "blocksparse"
    # float32 narrow bands: Flex's compiled kernel measured ~1.3x faster (attnkit bench)
    assert attnkit.explain(long, long, long, mask=window).chosen == "flex"
    # float32 dense: SDPA's kernel is at matmul speed; decoding: fixed costs dominate
    assert attnkit.explain(long, long, long).chosen == "sdpa"
    assert attnkit.explain(long[:, :1], long, long, mask=masks.causal()).chosen == "sdpa"
