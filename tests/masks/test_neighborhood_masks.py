"""Neighborhood (NA/DiNA/GNA) and halo masks against dense definitions written here, their exact
block structure, the dense limits, errors, and runs on every backend with GQA."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from mask_helpers import (
    assert_blocks_exact,
    brute_force_kinds,
    check_backends,
    classic_keys,
)

import attnkit
from attnkit import masks, testing
from attnkit.masks.neighborhood import GridMask, range_boxes


def gna_keys(
    x: int, length: int, kernel: int, dilation: int, stride: int, causal: bool
) -> set[int]:
    """GNA along one axis (NATTEN's FlexAttention mask, written as loops): the query's dilation
    group is its own axis; a stride group shares the window of its leader (centre query, or
    last query when causal)."""
    group = x % dilation
    n = len(range(group, length, dilation))
    xs = x // dilation
    if causal:
        leader = min((xs // stride) * stride + stride - 1, n - 1)
        keys = [y for y in range(n) if y <= xs and leader - y < kernel]
    else:
        leader = min((xs // stride) * stride + stride // 2, n - 1)
        left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
        centre = min(max(leader, left), n - 1 - right)
        keys = list(range(centre - left, centre + right + 1))
    return {y * dilation + group for y in keys}


def grid_dense(grid: tuple[int, ...], axis_keys, Tq: int | None = None) -> torch.Tensor:
    """``[1, 1, Tq, T]`` from per-axis key sets of each query's coordinates."""
    coords = list(itertools.product(*(range(g) for g in grid)))
    T = len(coords)
    Tq = T if Tq is None else Tq
    dense = torch.zeros(1, 1, Tq, T, dtype=torch.bool)
    for i in range(Tq):
        x = coords[i + T - Tq]
        allowed = [
            axis_keys(axis, xi, size) for axis, (xi, size) in enumerate(zip(x, grid, strict=True))
        ]
        for j, y in enumerate(coords):
            dense[0, 0, i, j] = all(yi in a for yi, a in zip(y, allowed, strict=True))
    return dense


CLASSIC = {  # grid, kernel, dilation: odd kernels, dilations that do not divide the size
    "1d_13_k5_d2": ((13,), (5,), (2,)),
    "2d_5x7_k3_d1x2": ((5, 7), (3, 3), (1, 2)),
    "2d_7x6_k3x5_d2x1": ((7, 6), (3, 5), (2, 1)),
    "2d_9x11_k3_d3": ((9, 11), (3, 3), (3, 3)),
    "3d_4x5x6_k3x3x5": ((4, 5, 6), (3, 3, 5), (1, 1, 1)),
    "3d_6x7x5_k3_d2x2x1": ((6, 7, 5), (3, 3, 3), (2, 2, 1)),
}

GNA = {  # grid, kernel, dilation, stride, causal: even kernels, strides, causal axes
    "1d_11_k4_s2": ((11,), (4,), (1,), (2,), (False,)),
    "1d_17_k5_d2_s3_causal": ((17,), (5,), (2,), (3,), (True,)),
    "1d_12_k4_blocked": ((12,), (4,), (1,), (4,), (False,)),
    "2d_9x10_k4x3_s2x3_causal_rows": ((9, 10), (4, 3), (1, 1), (2, 3), (True, False)),
    "2d_8x7_k2x7_d3x1_causal_cols": ((8, 7), (2, 7), (3, 1), (1, 1), (False, True)),
    "3d_5x6x7_mixed": ((5, 6, 7), (2, 3, 4), (1, 2, 1), (2, 1, 4), (False, True, False)),
    "3d_4x4x6_causal_frames": ((4, 4, 6), (3, 3, 3), (1, 1, 2), (1, 1, 1), (True, False, False)),
}


@pytest.mark.parametrize("name", list(CLASSIC))
def test_matches_natten_window_formula(name: str) -> None:
    grid, kernel, dilation = CLASSIC[name]
    mask = masks.neighborhood(kernel, grid, dilation=dilation)
    T = math.prod(grid)
    expected = grid_dense(grid, lambda a, x, n: classic_keys(x, n, kernel[a], dilation[a]))
    assert torch.equal(mask.dense(T, T), expected)
    # every query attends exactly prod(kernel) keys (the inward shift at the borders)
    assert torch.all(expected.sum(-1) == math.prod(kernel))


@pytest.mark.parametrize("name", list(GNA))
def test_matches_generalized_neighborhood_semantics(name: str) -> None:
    grid, kernel, dilation, stride, causal = GNA[name]
    mask = masks.neighborhood(kernel, grid, dilation=dilation, stride=stride, causal=causal)
    T = math.prod(grid)

    def axis_keys(a: int, x: int, n: int) -> set[int]:
        return gna_keys(x, n, kernel[a], dilation[a], stride[a], causal[a])

    assert torch.equal(mask.dense(T, T), grid_dense(grid, axis_keys))
    # Tq < Tk: the queries are the last tokens of the grid (bottom-right alignment)
    assert torch.equal(mask.dense(T // 3, T), grid_dense(grid, axis_keys, T // 3))


@pytest.mark.parametrize("name", list(CLASSIC) + list(GNA))
def test_neighborhood_blocks_are_exact(name: str) -> None:
    grid, kernel, dilation, *rest = CLASSIC[name] if name in CLASSIC else GNA[name]
    stride, causal = rest if rest else (1, False)
    mask = masks.neighborhood(kernel, grid, dilation=dilation, stride=stride, causal=causal)
    T = math.prod(grid)
    assert_blocks_exact(mask, T, T)
    assert_blocks_exact(mask, T // 3 + 1, T)


def test_blocks_exact_on_a_larger_grid_with_realistic_tiles() -> None:
    mask = masks.neighborhood((5, 7), (24, 40), dilation=(2, 3), stride=(1, 2))
    T = 24 * 40
    expected = brute_force_kinds(mask.dense(T, T), 64, 64)
    assert torch.equal(mask.blocks(T, T, 64, 64).kinds, expected)
    live = (expected != 0).float().mean().item()
    assert live < 0.5, "a local pattern must leave most tiles empty"


def test_blocks_at_16k_evaluate_no_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tile_kinds evaluated the predicate")

    monkeypatch.setattr(GridMask, "predicate", refuse)
    mask = masks.neighborhood(
        (7, 7, 3), (16, 32, 32), dilation=(1, 2, 1), causal=(True, False, False)
    )
    kinds = mask.blocks(16384, 16384).kinds
    assert kinds.shape == (1, 1, 128, 128)
    assert 0 < (kinds != 0).float().mean().item() < 0.3


def test_causal_flag_types_are_checked() -> None:
    with pytest.raises(TypeError, match="causal must be a bool"):
        masks.neighborhood(3, (5, 5), causal=(1, 0))


def test_kernel_equal_to_grid_is_dense_attention() -> None:
    mask = masks.neighborhood((5, 7), (5, 7))
    assert bool(mask.dense(35, 35).all())
    assert bool(mask.blocks(35, 35, 8, 16).kinds.eq(masks.FULL).all())
    q, k, v = testing.Case("na_full", B=1, Tq=35, Tk=35, Hq=2, Hkv=2, D=16).make()
    with_mask = attnkit.attention(q, k, v, mask=mask, backend="reference")
    torch.testing.assert_close(with_mask, attnkit.attention(q, k, v, backend="reference"))


def test_1d_causal_kernel_of_full_length_is_causal() -> None:
    mask = masks.neighborhood(40, causal=True)
    assert torch.equal(mask.dense(40, 40), masks.causal().dense(40, 40))
    assert torch.equal(mask.dense(9, 40), masks.causal().dense(9, 40))


def test_1d_without_grid_uses_the_call_length() -> None:
    mask = masks.neighborhood(5, dilation=2)
    for T in (11, 20):
        expected = grid_dense((T,), lambda a, x, n: classic_keys(x, n, 5, 2))
        assert torch.equal(mask.dense(T, T), expected)


def test_range_boxes_cover_the_flat_range_exactly() -> None:
    grid = (3, 4, 5)
    T = math.prod(grid)
    g = torch.Generator().manual_seed(0)
    lo = torch.randint(0, T, (200,), generator=g)
    hi = torch.minimum(lo + torch.randint(0, T, (200,), generator=g), torch.tensor(T - 1))
    b_lo, b_hi = range_boxes(lo, hi, grid)
    assert b_lo.shape == (200, 5, 3)
    coords = torch.tensor(list(itertools.product(*(range(s) for s in grid))))  # [T, 3]
    inside = (coords[None, None] >= b_lo[:, :, None]) & (coords[None, None] <= b_hi[:, :, None])
    hits = inside.all(-1).sum(1)  # [200, T]: how many boxes hold each token
    expected = (torch.arange(T)[None] >= lo[:, None]) & (torch.arange(T)[None] <= hi[:, None])
    assert torch.equal(hits, expected.long())


HALO = {  # grid, block, halo
    "1d_13_b4_h2": ((13,), (4,), (2,)),
    "2d_7x9_b3x4_h1x2": ((7, 9), (3, 4), (1, 2)),
    "3d_5x6x7_b2x3x4_h1x0x2": ((5, 6, 7), (2, 3, 4), (1, 0, 2)),
}


@pytest.mark.parametrize("name", list(HALO))
def test_halo_matches_blocks_plus_halo(name: str) -> None:
    grid, block, halo = HALO[name]
    mask = masks.halo(block, halo, grid)

    def axis_keys(a: int, x: int, n: int) -> set[int]:
        start = (x // block[a]) * block[a]
        return set(range(max(start - halo[a], 0), min(start + block[a] + halo[a], n)))

    T = math.prod(grid)
    assert torch.equal(mask.dense(T, T), grid_dense(grid, axis_keys))
    assert_blocks_exact(mask, T, T)
    assert_blocks_exact(mask, T // 2, T)


def test_halo_zero_is_blocked_attention_and_equals_gna_blocked() -> None:
    blocked = masks.neighborhood((3, 4), (6, 8), stride=(3, 4))
    assert torch.equal(masks.halo((3, 4), 0, (6, 8)).dense(48, 48), blocked.dense(48, 48))


def test_names_describe_the_pattern() -> None:
    mask = masks.neighborhood((3, 5), (7, 9), dilation=(2, 1), causal=(True, False))
    assert repr(mask) == "neighborhood(k=3,d=2,causal; k=5, grid=(7, 9))"
    assert repr(masks.halo(4, 1)) == "halo(b=4,h=1)"


ERRORS = {
    "kernel_larger_than_axis": (lambda: masks.neighborhood(9, (5, 12)), "kernel_size \\* dilation"),
    "dilation_times_kernel": (
        lambda: masks.neighborhood(3, (7, 9), dilation=(3, 1)),
        "3 \\* 3 = 9",
    ),
    "stride_above_kernel": (lambda: masks.neighborhood(3, (7, 9), stride=4), "stride 4 exceeds"),
    "kernel_axes_vs_grid": (lambda: masks.neighborhood((3, 3, 3), (7, 9)), "has 3 entries"),
    "zero_kernel": (lambda: masks.neighborhood(0, (7, 9)), "kernel_size must be an int >= 1"),
    "2d_kernel_without_grid": (lambda: masks.neighborhood((3, 3)), "pass grid"),
    "zero_grid": (lambda: masks.neighborhood(1, (0, 4)), "grid sizes must be >= 1"),
    "negative_halo": (lambda: masks.halo(4, -1, (8,)), "halo must be an int >= 0"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_arguments_are_refused(name: str) -> None:
    build, message = ERRORS[name]
    with pytest.raises(ValueError, match=message):
        build()


def test_grid_product_must_match_the_call() -> None:
    q, k, v = testing.Case("na_bad", B=1, Tq=64, Tk=64, Hq=2, Hkv=2, D=16).make()
    with pytest.raises(ValueError, match="grid \\(7, 9\\) = 63 tokens but this call has Tk=64"):
        attnkit.attention(q, k, v, mask=masks.neighborhood(3, (7, 9)))
    with pytest.raises(ValueError, match="needs Tq <= Tk"):
        attnkit.attention(q, k[:, :63], v[:, :63], mask=masks.neighborhood(3, (7, 9)))
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        attnkit.attention(q[:, :4], k[:, :4], v[:, :4], mask=masks.neighborhood(5))


def test_backends_match_reference_with_gqa() -> None:
    mask = masks.neighborhood((3, 5), (7, 9), dilation=(2, 1), causal=(True, False))
    check_backends(mask, testing.Case("gqa_63", B=2, Tq=63, Tk=63, Hq=8, Hkv=2, D=16))


TILED_MASKS = {  # the backends that read the block structure (chunked) and the BlockMask (flex)
    "gna_3d_strided": lambda: masks.neighborhood((2, 3, 3), (3, 3, 7), stride=(1, 3, 2)),
    "na1d_no_grid": lambda: masks.neighborhood(9, dilation=3),
    "halo_2d": lambda: masks.halo((3, 4), 1, (7, 9)),
}


@pytest.mark.parametrize("name", list(TILED_MASKS))
def test_tiled_backends_match_reference(name: str) -> None:
    case = testing.Case("gqa_63", B=1, Tq=63, Tk=63, Hq=8, Hkv=2, D=16)
    check_backends(TILED_MASKS[name](), case, backends=("chunked",))


def test_decoding_the_last_tokens_of_a_grid() -> None:
    mask = masks.neighborhood(3, (7, 9), causal=(True, False))
    case = testing.Case("decode", B=1, Tq=9, Tk=63, Hq=4, Hkv=2, D=16)
    check_backends(mask, case, backends=("chunked",), flex_forward=False)
