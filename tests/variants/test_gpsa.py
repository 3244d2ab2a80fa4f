"""ConViT's GPSA: relative grid positions as ConViT builds them, the positional bias, the gated
sum on the fast backends against the dense formula (forward and backward), the locality
initialisation, the module and the exact reductions."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch.func import functional_call

import attnkit
from attnkit.positional import (
    GridPositionBias,
    grid_position_bias,
    grid_relative_positions,
    locality_init,
)
from attnkit.testing import Case, check_against_reference, check_function
from attnkit.variants import GPSA, gated_positional_attention, gated_positional_attention_reference

GRID = (6, 7)
CASE = Case("grid_42", B=2, Tq=42, Tk=42, Hq=4, Hkv=4, D=16)


def test_relative_positions_as_convit_builds_them() -> None:
    """ConViT (square grids): ``ind[a, b] = b - a``; δx tiles ``ind`` over the grid, δy repeats
    each entry of ``ind`` per row and column of patches."""
    side = 5
    ind = torch.arange(side).view(1, -1) - torch.arange(side).view(-1, 1)
    dx = ind.repeat(side, side)
    dy = ind.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1)
    expected = torch.stack([dx, dy, dx**2 + dy**2], dim=-1).float()
    assert torch.equal(grid_relative_positions((side, side)), expected)


def test_relative_positions_on_a_rectangular_grid() -> None:
    r = grid_relative_positions(GRID)
    for i in (0, 9, 41):
        for j in (0, 13, 40):
            (yi, xi), (yj, xj) = divmod(i, 7), divmod(j, 7)
            assert r[i, j].tolist() == [xj - xi, yj - yi, (xj - xi) ** 2 + (yj - yi) ** 2]


def test_bias_is_r_dot_v_pos() -> None:
    weight = torch.randn(4, 3)
    dense = GridPositionBias(weight, GRID).dense(42, 42)
    expected = torch.einsum("ijc,hc->hij", grid_relative_positions(GRID), weight)
    torch.testing.assert_close(dense, expected)


def test_locality_init_matches_convit() -> None:
    # H = 4: a 2x2 kernel, centre 0.5; head h1 + 2 h2 gets (2 (h2 - c), 2 (h1 - c), -1) * alpha.
    expected = torch.tensor(
        [[-1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [1.0, 1.0, -1.0]]
    )
    torch.testing.assert_close(locality_init(4, locality_strength=2.0), 2 * expected)
    # H = 10: heads past 3x3 keep a small random draw
    extra = locality_init(10, generator=torch.Generator().manual_seed(0))[9]
    assert extra.abs().max() < 0.05


def test_locality_init_makes_each_head_a_convolution_tap() -> None:
    bias = grid_position_bias(9, (7, 7), locality_strength=3.0)
    centre = 3 * 7 + 3
    scores = bias.dense(49, 49)[:, centre]  # [H, N] for the centre patch
    for h1 in range(3):
        for h2 in range(3):
            y, x = divmod(int(scores[h1 + 3 * h2].argmax()), 7)
            assert (x - 3, y - 3) == (h2 - 1, h1 - 1)


def gpsa_inputs(dtype=torch.float32, Hkv: int = 4):
    q, k, v = Case("g", B=2, Tq=42, Tk=42, Hq=4, Hkv=Hkv, D=16).make(dtype, requires_grad=False)
    gate = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=dtype)
    weight = locality_init(4, 0.5, generator=torch.Generator().manual_seed(0)).to(dtype)
    return {"q": q, "k": k, "v": v, "gate": gate, "weight": weight}


def fast(q, k, v, gate, weight, backend="auto"):
    bias = GridPositionBias(weight, GRID)
    return gated_positional_attention(q, k, v, gate, bias, backend=backend)


def reference(q, k, v, gate, weight):
    return gated_positional_attention_reference(q, k, v, gate, weight, GRID)


@pytest.mark.parametrize(
    ("backend", "dtype", "Hkv"),
    [
        ("auto", torch.float32, 4),
        ("sdpa", torch.float32, 2),
        ("chunked", torch.float32, 4),
        ("chunked", torch.bfloat16, 1),
    ],
)
def test_matches_the_dense_formula_forward_and_backward(backend, dtype, Hkv) -> None:
    inputs = gpsa_inputs(dtype, Hkv)
    check_function(partial(fast, backend=backend), reference, inputs).assert_ok()


def test_positional_bias_gradient_through_attention_backends() -> None:
    q, k, v = CASE.make()
    bias = grid_position_bias(4, GRID, generator=torch.Generator().manual_seed(1))
    for backend in ("sdpa", "chunked"):
        report = check_against_reference(
            partial(attnkit.attention, backend=backend), q, k, v, bias=bias
        )
        report.assert_ok()
        assert report.comparisons[-1].name == "dgrid_position[0]"


def test_bias_runs_in_flex(backend_context) -> None:
    q, k, v = CASE.make(requires_grad=False)
    bias = GridPositionBias(locality_init(4), GRID)
    with backend_context("flex"):
        check_against_reference(
            partial(attnkit.attention, backend="flex"), q, k, v, grads=False, bias=bias
        ).assert_ok()


def test_gate_closed_is_plain_attention_and_open_is_positional() -> None:
    x = gpsa_inputs(torch.float64)
    q, k, v, weight = x["q"], x["k"], x["v"], x["weight"]
    closed = fast(q, k, v, torch.full((4,), -math.inf, dtype=torch.float64), weight)
    torch.testing.assert_close(closed, attnkit.attention(q, k, v, backend="reference"))
    opened = fast(q, k, v, torch.full((4,), math.inf, dtype=torch.float64), weight * 0)
    torch.testing.assert_close(opened, v.mean(dim=1, keepdim=True).expand_as(opened))


def test_module_matches_the_formula_forward_and_backward() -> None:
    torch.manual_seed(0)
    layer = GPSA(32, 4, GRID, locality_strength=0.5)
    assert torch.equal(layer.v.weight, torch.eye(32)) and torch.equal(layer.gate, torch.ones(4))
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(2, 42, 32)

    def by_formula(x, **p):
        B, N, C = x.shape
        q, k = (x @ p["qk.weight"].T).view(B, N, 2, 4, 8).unbind(2)
        v = (x @ p["v.weight"].T).view(B, N, 4, 8)
        out = gated_positional_attention_reference(q, k, v, p["gate"], p["pos_weight"], GRID)
        return out.reshape(B, N, C) @ p["proj.weight"].T + p["proj.bias"]

    check_function(
        lambda x, **p: functional_call(layer, p, (x,)), by_formula, {"x": x} | params
    ).assert_ok()


def test_module_with_closed_gates_is_multi_head_self_attention() -> None:
    layer = GPSA(32, 4, GRID).double()
    with torch.no_grad():
        layer.gate.fill_(-math.inf)
    x = torch.randn(2, 42, 32, dtype=torch.float64)
    q, k = layer.qk(x).view(2, 42, 2, 4, 8).unbind(2)
    v = layer.v(x).view(2, 42, 4, 8)
    mhsa = layer.proj(attnkit.attention(q, k, v, backend="reference").reshape(2, 42, 32))
    torch.testing.assert_close(layer(x), mhsa)


def test_rejects_bad_inputs() -> None:
    x = gpsa_inputs()
    bias = GridPositionBias(x["weight"], (6, 6))
    with pytest.raises(ValueError, match="6x6 = 36 patches of its grid, got 42 tokens"):
        gated_positional_attention(x["q"], x["k"], x["v"], x["gate"], bias)
    with pytest.raises(ValueError, match=r"gate must be \[H\] = \[4\]"):
        fast(x["q"], x["k"], x["v"], torch.zeros(3), x["weight"])
    with pytest.raises(TypeError, match="position_bias must be a GridPositionBias"):
        gated_positional_attention(x["q"], x["k"], x["v"], x["gate"], attnkit.positional.alibi(4))
    with pytest.raises(ValueError, match=r"grid must be \(height, width\)"):
        grid_relative_positions((6,))
    with pytest.raises(ValueError, match=r"weight must be \[4, 3\]"):
        grid_position_bias(4, GRID, weight=torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"d_model \(30\) must be a multiple of n_heads \(4\)"):
        GPSA(30, 4, GRID)
