"""Per-head patterns (per_head, MoA windows, DuoAttention) against per-head dense definitions;
block structure per head; GQA forward and backward on every backend; errors."""

from __future__ import annotations

import pytest
import torch
from mask_helpers import assert_blocks_exact, assert_blocks_sound, check_backends, dense_from

import attnkit
from attnkit import masks, testing

GQA = testing.Case("gqa_8_2", B=2, Tq=45, Tk=45, Hq=8, Hkv=2, D=16)
SIZES = [(45, 45), (13, 50), (1, 50)]


def stacked_dense(per_head_masks: list[masks.Mask], Tq: int, Tk: int) -> torch.Tensor:
    return torch.cat([m.dense(Tq, Tk) for m in per_head_masks], dim=1)


EIGHT = [
    masks.causal(),
    masks.sliding_window(3, 3),
    masks.chunked(5),
    masks.neighborhood(5, dilation=2),
    masks.causal() & masks.sliding_window(7),
    masks.block_causal(4),
    masks.dilated_window(2, 2, dilation=3),
    masks.full(),
]


def test_per_head_stacks_the_masks() -> None:
    mask = masks.per_head(EIGHT)
    assert mask.num_heads == 8
    for Tq, Tk in SIZES:
        assert torch.equal(mask.dense(Tq, Tk), stacked_dense(EIGHT, Tq, Tk))
        assert_blocks_exact(mask, Tq, Tk)


def test_per_head_shares_masks_through_head_index() -> None:
    a, b, unused = masks.causal(), masks.chunked(4), masks.full()
    mask = masks.per_head([a, b, unused], head_index=[1, 0, 0, 1])
    assert len(mask.masks) == 2, "a mask no head uses is dropped"
    expected = stacked_dense([b, a, a, b], 30, 30)
    assert torch.equal(mask.dense(30, 30), expected)
    assert_blocks_exact(mask, 30, 30)
    repeated = masks.per_head([a, b, a, a])
    assert len(repeated.masks) == 2, "a mask object given twice is evaluated once"
    assert torch.equal(repeated.dense(30, 30), stacked_dense([a, b, a, a], 30, 30))


def test_per_head_with_per_batch_masks() -> None:
    docs = masks.documents(torch.tensor([[0] * 10 + [1] * 20, [0] * 25 + [1] * 5]))
    mask = masks.per_head([docs & masks.causal(), masks.causal()])
    assert mask.batch_size == 2
    dense = mask.dense(30, 30)
    assert torch.equal(dense[:, 0], (docs & masks.causal()).dense(30, 30)[:, 0])
    assert torch.equal(dense[:, 1], masks.causal().dense(30, 30).expand(2, 1, 30, 30)[:, 0])
    assert assert_blocks_sound(mask, 30, 30) > 0.9


def test_moa_windows_per_head() -> None:
    spans = [1, 3, 7, 100]
    mask = masks.windows_per_head(spans)
    for Tq, Tk in SIZES:
        expected = dense_from(lambda h, p, k: 0 <= p - k < spans[h], Tq, Tk, heads=4)
        assert torch.equal(mask.dense(Tq, Tk), expected)
        assert_blocks_exact(mask, Tq, Tk)
    assert torch.equal(mask.dense(50, 50)[:, 3:], masks.causal().dense(50, 50))
    assert torch.equal(mask.dense(50, 50)[:, 1:2], masks.sliding_window(2).dense(50, 50))


def test_duo_retrieval_heads_are_causal_and_streaming_heads_sinks_plus_window() -> None:
    retrieval = torch.tensor([True, False, False, True])
    mask = masks.duo(retrieval, sinks=2, window=5)

    def rule(h: int, p: int, k: int) -> bool:
        if retrieval[h]:
            return k <= p
        return k <= p and (k < 2 or p - k < 5)

    for Tq, Tk in SIZES:
        assert torch.equal(mask.dense(Tq, Tk), dense_from(rule, Tq, Tk, heads=4))
        assert assert_blocks_sound(mask, Tq, Tk) > 0.95


def test_per_head_composes_with_shared_masks() -> None:
    mask = masks.windows_per_head([2, 9]) | (masks.sinks(3) & masks.causal())
    dense = mask.dense(20, 20)
    assert dense.shape == (1, 2, 20, 20)
    assert bool(dense[0, :, 10:, :3].all())
    assert assert_blocks_sound(mask, 20, 20) > 0.9


@pytest.mark.parametrize(
    "name",
    ["per_head", "moa_windows", "duo"],
)
def test_gqa_forward_backward_on_every_backend(name: str) -> None:
    build = {
        "per_head": lambda: masks.per_head(EIGHT),
        "moa_windows": lambda: masks.windows_per_head([1, 2, 4, 8, 16, 32, 64, 45]),
        "duo": lambda: masks.duo(torch.tensor([True, True, False, False] * 2), 4, 8),
    }[name]
    check_backends(build(), GQA)


ERRORS = {
    "empty": (lambda: masks.per_head([]), ValueError, "at least one mask"),
    "not_a_mask": (lambda: masks.per_head([masks.causal(), "causal"]), TypeError, "not an attnkit"),
    "nested": (
        lambda: masks.per_head([masks.windows_per_head([1, 2])]),
        ValueError,
        "itself a 2-head pattern",
    ),
    "index_range": (
        lambda: masks.per_head([masks.causal()], head_index=[0, 1]),
        ValueError,
        "must lie in \\[0, 1\\)",
    ),
    "zero_span": (lambda: masks.windows_per_head([4, 0]), ValueError, "spans must be >= 1"),
    "float_spans": (lambda: masks.windows_per_head([1.5]), ValueError, "one integer per head"),
    "duo_flags": (lambda: masks.duo(torch.tensor([1, 0]), 4, 8), ValueError, "bool tensor"),
    "duo_window": (lambda: masks.duo(torch.tensor([True]), 4, 0), ValueError, "window"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_arguments_are_refused(name: str) -> None:
    build, error, message = ERRORS[name]
    with pytest.raises(error, match=message):
        build()


def test_head_count_must_match_the_call() -> None:
    q, k, v = testing.Case("h4", B=1, Tq=20, Tk=20, Hq=4, Hkv=2, D=16).make()
    with pytest.raises(ValueError, match="has a pattern for 8 heads but q has 4 heads"):
        attnkit.attention(q, k, v, mask=masks.per_head(EIGHT))


def test_dense_limits() -> None:
    causal = masks.causal().dense(30, 30)
    all_retrieval = masks.duo(torch.ones(3, dtype=torch.bool), sinks=2, window=4).dense(30, 30)
    assert bool((all_retrieval == causal).all())
    streaming_everything = masks.duo(torch.zeros(2, dtype=torch.bool), sinks=0, window=30)
    assert bool((streaming_everything.dense(30, 30) == causal).all())
    assert bool((masks.windows_per_head([30, 99]).dense(30, 30) == causal).all())
