"""NA/DiNA layers (attnkit.nn.neighborhood) against a from-scratch neighbourhood attention with
NATTEN's relative positional bias, forward and backward under the 2x rule."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from mask_helpers import natten_window_start
from torch import Tensor

import attnkit
from attnkit import masks, testing
from attnkit.nn.neighborhood import (
    NeighborhoodAttention,
    NeighborhoodAttention1d,
    NeighborhoodAttention2d,
    NeighborhoodAttention3d,
    NeighborhoodBias,
)


def neighbours(grid: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...]):
    """Key indices ``[T, K]`` of each query and their rpb offsets ``[T, K, n]`` (loops, with
    NATTEN's window-start formula)."""
    coords = list(itertools.product(*(range(g) for g in grid)))
    flat = {c: i for i, c in enumerate(coords)}
    index, offsets = [], []
    for x in coords:
        per_axis = [
            [natten_window_start(xi, n, k, d) + j * d for j in range(k)]
            for xi, n, k, d in zip(x, grid, kernel, dilation, strict=True)
        ]
        keys = list(itertools.product(*per_axis))
        index.append([flat[y] for y in keys])
        offsets.append(
            [
                [
                    yi // d - xi // d + k - 1
                    for yi, xi, k, d in zip(y, x, kernel, dilation, strict=True)
                ]
                for y in keys
            ]
        )
    return torch.tensor(index), torch.tensor(offsets)


def na_reference(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    rpb: Tensor | None,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    heads: int,
) -> Tensor:
    """NATTEN's NA module written out: qkv, per-query softmax over its neighbours (+ rpb),
    output projection. ``x [B, *grid, C]``."""
    B, grid, C = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
    T, Dh = math.prod(grid), C // heads
    qkv = (x.reshape(B, T, C) @ qkv_weight.T + qkv_bias).view(B, T, 3, heads, Dh)
    q, k, v = qkv.unbind(2)
    index, offsets = neighbours(grid, kernel, dilation)
    scores = torch.einsum("bthd,btkhd->bhtk", q, k[:, index]) / math.sqrt(Dh)
    if rpb is not None:
        scores = scores + rpb[(slice(None), *offsets.unbind(-1))]
    out = torch.einsum("bhtk,btkhd->bthd", torch.softmax(scores, -1), v[:, index])
    return out.reshape(B, *grid, C) @ proj_weight.T + proj_bias


def check_layer(layer: NeighborhoodAttention, x: Tensor) -> None:
    params = dict(layer.named_parameters())
    inputs = {"x": x, **{name.replace(".", "_"): p.detach() for name, p in params.items()}}

    def run(**tensors: Tensor) -> Tensor:
        weights = {name: tensors[name.replace(".", "_")] for name in params}
        return torch.func.functional_call(layer, weights, (tensors["x"],))

    def reference(**tensors: Tensor) -> Tensor:
        return na_reference(
            tensors["x"],
            tensors["qkv_weight"],
            tensors["qkv_bias"],
            tensors["proj_weight"],
            tensors["proj_bias"],
            tensors.get("rpb"),
            layer.kernel_size,
            layer.dilation,
            layer.num_heads,
        )

    testing.check_function(run, reference, inputs).assert_ok()


LAYERS = {
    "na2d_rpb": (partial(NeighborhoodAttention2d, 16, 2, 3, rel_pos_bias=True), (2, 5, 7, 16)),
    "dina2d_rpb_chunked": (
        partial(
            NeighborhoodAttention2d, 16, 2, (3, 5), (2, 1), rel_pos_bias=True, backend="chunked"
        ),
        (1, 7, 6, 16),
    ),
    "na1d_dilated_rpb": (
        partial(NeighborhoodAttention1d, 8, 2, 5, 2, rel_pos_bias=True, backend="sdpa"),
        (2, 13, 8),
    ),
    "na3d": (partial(NeighborhoodAttention3d, 8, 2, (3, 3, 3), backend="chunked"), (1, 3, 4, 5, 8)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_natten_module_semantics(name: str) -> None:
    build, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = build()
    check_layer(layer, torch.randn(shape))


def test_full_kernel_without_bias_is_multi_head_self_attention() -> None:
    torch.manual_seed(1)
    layer = NeighborhoodAttention2d(16, 4, (4, 6))
    x = torch.randn(2, 4, 6, 16)
    q, k, v = layer.qkv(x).reshape(2, 24, 3, 4, 4).unbind(2)
    dense = attnkit.attention(q, k, v, backend="reference").reshape(2, 4, 6, 16)
    torch.testing.assert_close(layer(x), layer.proj(dense))


def test_one_layer_serves_several_image_sizes() -> None:
    layer = NeighborhoodAttention2d(8, 2, 3, dilation=2)
    for size in ((6, 7), (9, 6)):
        assert layer(torch.randn(1, *size, 8)).shape == (1, *size, 8)
    assert len(layer._masks) == 2


def test_layer_errors() -> None:
    with pytest.raises(ValueError, match="multiple of num_heads"):
        NeighborhoodAttention2d(10, 4, 3)
    layer = NeighborhoodAttention2d(8, 2, 5)
    with pytest.raises(ValueError, match="expects \\[B, H, W, C\\] with C=8"):
        layer(torch.randn(1, 6, 6, 6, 8))
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        layer(torch.randn(1, 4, 9, 8))
    with pytest.raises(ValueError, match="kernel_size has 3 entries"):
        NeighborhoodAttention2d(8, 2, (3, 3, 3))
    with pytest.raises(ValueError, match="rpb table must be \\[H, 5, 5\\]"):
        NeighborhoodBias(torch.zeros(2, 5, 3), (6, 6), (3, 3), (1, 1))


def test_bias_indexes_offsets_in_dilation_groups() -> None:
    table = torch.arange(2 * 5 * 5, dtype=torch.float64).view(2, 5, 5)
    bias = NeighborhoodBias(table, (6, 8), (3, 3), (1, 2))
    # query (2, 1), key (3, 5): one row down; columns 1 and 5 are group-1 positions 0 and 2
    query, key = torch.tensor(2 * 8 + 1), torch.tensor(3 * 8 + 5)
    assert bias.value(torch.tensor(1), query, key).item() == table[1, 1 + 2, 2 + 2].item()
    assert masks.neighborhood(3, (6, 8), dilation=(1, 2)).dense(48, 48)[0, 0, query, key]
