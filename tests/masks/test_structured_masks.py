"""Dilated / strided windows and global tokens against dense definitions written here; exact
block structure; limits; composition; errors; backends."""

from __future__ import annotations

import pytest
import torch
from mask_helpers import assert_blocks_exact, assert_blocks_sound, check_backends, dense_from

import attnkit
from attnkit import masks, testing

SIZES = [(37, 37), (13, 50), (1, 50)]

DEFINITIONS = {
    "dilated_3_2_d3": (
        masks.dilated_window(3, 2, dilation=3),
        lambda h, p, k: (k - p) % 3 == 0 and -9 <= k - p <= 6,
    ),
    "dilated_causal_4_d2": (
        masks.dilated_window(4, dilation=2),
        lambda h, p, k: (p - k) % 2 == 0 and 0 <= p - k <= 8,
    ),
    "strided_4": (masks.strided(4), lambda h, p, k: (p - k) % 4 == 0 and k <= p),
    "strided_3_bidirectional": (masks.strided(3, causal=False), lambda h, p, k: (p - k) % 3 == 0),
    "global_positions": (
        masks.global_tokens([0, 7, 8, 20]),
        lambda h, p, k: p in (0, 7, 8, 20) or k in (0, 7, 8, 20),
    ),
    "global_first_3": (masks.global_tokens(3), lambda h, p, k: p < 3 or k < 3),
    "global_none": (masks.global_tokens([]), lambda h, p, k: False),
}


@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_pattern_matches_its_definition_and_blocks_are_exact(name: str) -> None:
    mask, rule = DEFINITIONS[name]
    for Tq, Tk in SIZES:
        assert torch.equal(mask.dense(Tq, Tk), dense_from(rule, Tq, Tk))
        assert_blocks_exact(mask, Tq, Tk)


def test_dilation_one_is_the_sliding_window() -> None:
    for Tq, Tk in SIZES:
        expected = masks.sliding_window(5, 2).dense(Tq, Tk)
        assert torch.equal(masks.dilated_window(5, 2, dilation=1).dense(Tq, Tk), expected)
        assert torch.equal(masks.strided(1).dense(Tq, Tk), masks.causal().dense(Tq, Tk))


def test_sparse_transformer_factorisation_covers_the_causal_context_in_two_steps() -> None:
    """Child et al.: strided(s) | window of s keys reaches every earlier key in two hops."""
    s, T = 6, 60
    pattern = (masks.strided(s) | masks.sliding_window(s - 1)).dense(T, T)[0, 0].int()
    two_hops = (pattern @ pattern) > 0
    assert torch.equal(two_hops, masks.causal().dense(T, T)[0, 0])


def test_global_tokens_compose_with_a_window_and_causality() -> None:
    mask = (masks.sliding_window(2, 2) | masks.global_tokens([0, 9])) & masks.causal()
    dense = mask.dense(30, 30)[0, 0]
    assert bool(dense[:, 0].all()) and bool(dense[9:, 9].all())  # everyone sees the globals
    assert bool(dense[9, :10].all()) and not dense[9, 10:].any()  # a causal global token
    assert assert_blocks_sound(mask, 30, 30) > 0.9


ERRORS = {
    "negative_left": (lambda: masks.dilated_window(-1), "left must be an int >= 0"),
    "zero_dilation": (lambda: masks.dilated_window(3, dilation=0), "dilation must be an int >= 1"),
    "zero_stride": (lambda: masks.strided(0), "stride must be an int >= 1"),
    "negative_global": (lambda: masks.global_tokens([-1, 3]), "must be >= 0"),
    "float_global": (lambda: masks.global_tokens([1.5]), "integer positions"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_arguments_are_refused(name: str) -> None:
    build, message = ERRORS[name]
    with pytest.raises(ValueError, match=message):
        build()


def test_global_position_beyond_the_keys_is_refused() -> None:
    q, k, v = testing.Case("short", B=1, Tq=20, Tk=20, Hq=2, Hkv=2, D=16).make()
    with pytest.raises(ValueError, match="marks position 25 global but this call has only Tk=20"):
        attnkit.attention(q, k, v, mask=masks.global_tokens([3, 25]))


BACKEND_MASKS = {
    "dilated_window": lambda: masks.dilated_window(4, 4, dilation=3),
    "strided_or_window": lambda: masks.strided(5) | masks.sliding_window(4),
    "longformer": lambda: masks.sliding_window(3, 3) | masks.global_tokens([0, 17]),
}


@pytest.mark.parametrize("name", list(BACKEND_MASKS))
def test_backends_match_reference_with_gqa(name: str) -> None:
    case = testing.Case("gqa_45", B=1, Tq=45, Tk=45, Hq=8, Hkv=2, D=16)
    backends = ("reference", "sdpa", "chunked") if name == "dilated_window" else ("chunked",)
    check_backends(BACKEND_MASKS[name](), case, backends=backends)


def test_dense_limits() -> None:
    assert bool(masks.global_tokens(30).dense(30, 30).all())
    assert bool(masks.dilated_window(29, 29, dilation=1).dense(30, 30).all())
