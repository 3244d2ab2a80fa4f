"""KERPLE: both kernels against their formulas, parameter ranges, the reduction of the power
kernel to ALiBi, and gradients of r1/r2 through the fast backends."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnkit
from attnkit import masks, positional
from attnkit.testing import CASES, check_against_reference

R1 = torch.tensor([0.5, 1.0, 1.5, 2.0])
R2 = {"log": torch.tensor([0.1, 0.5, 1.0, 3.0]), "power": torch.tensor([0.2, 0.7, 1.3, 1.9])}


def test_both_kernels_follow_their_formulas_bottom_right() -> None:
    Tq, Tk = 6, 20
    position = torch.arange(Tq).view(-1, 1) + (Tk - Tq)
    distance = (position - torch.arange(Tk).view(1, -1)).abs().double()
    r1, r2 = R1.double().view(-1, 1, 1), {k: v.double().view(-1, 1, 1) for k, v in R2.items()}
    formulas = {
        "power": -r1 * distance ** r2["power"],
        "log": -r1 * torch.log(1 + r2["log"] * distance),
    }
    for kernel, expected in formulas.items():
        bias = positional.kerple(4, kernel, r1=R1, r2=R2[kernel])
        assert bias.name == f"kerple_{kernel}"
        torch.testing.assert_close(bias.r1, R1)
        torch.testing.assert_close(bias.r2, R2[kernel])
        torch.testing.assert_close(bias.dense(Tq, Tk).double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(bias.dense(Tq, Tk)[:, -1, -1], torch.zeros(4)), "no penalty at d = 0"


def test_power_kernel_with_exponent_one_is_alibi() -> None:
    bias = positional.kerple(4, "power", r1=positional.alibi_slopes(4), r2=torch.ones(4))
    alibi = positional.alibi(4)
    torch.testing.assert_close(bias.dense(9, 30), alibi.dense(9, 30), rtol=1e-6, atol=1e-6)


def test_parameters_stay_in_range_whatever_the_raw_values() -> None:
    power = positional.Kerple("power", torch.tensor([-30.0, 30.0]), torch.tensor([-30.0, 30.0]))
    log = positional.Kerple("log", torch.tensor([-30.0, 30.0]), torch.tensor([-30.0, 30.0]))
    for bias in (power, log):
        assert (bias.r1 > 0).all() and (bias.r2 > 0).all()
    assert (power.r2 <= 2).all()


def test_default_draw_follows_the_paper_code_and_is_trainable() -> None:
    g = torch.Generator().manual_seed(0)
    bias = positional.kerple(64, "log", generator=g)
    assert bias.parameters() == [bias.r1_raw, bias.r2_raw]
    assert all(p.is_leaf and p.requires_grad for p in bias.parameters())
    assert bias.r1.min() >= 0.01 and bias.r1.max() <= 2
    assert bias.r2.min() >= 0.01 and bias.r2.max() <= 1
    frozen = positional.kerple(4, "power", requires_grad=False)
    assert frozen.parameters() == []


@pytest.mark.parametrize(
    ("kernel", "backend", "case", "dtype", "causal"),
    [
        ("log", "reference", "cross_17x65_b2", torch.float32, True),
        ("log", "sdpa", "gqa_8_2", torch.float32, True),
        ("log", "chunked", "self_odd_63", torch.float32, False),
        ("power", "sdpa", "cross_17x65_b2", torch.float32, False),
        ("power", "chunked", "gqa_8_2", torch.float32, True),
        ("power", "chunked", "mqa_b2", torch.bfloat16, True),
    ],
)
def test_gradients_of_r1_r2_through_attention(kernel, backend, case, dtype, causal) -> None:
    q, k, v = CASES[case].make(dtype)
    bias = positional.kerple(q.shape[2], kernel, generator=torch.Generator().manual_seed(1))
    report = check_against_reference(
        partial(attnkit.attention, backend=backend),
        q, k, v, bias=bias, mask=masks.causal() if causal else None,
    )  # fmt: skip
    report.assert_ok()
    names = [c.name for c in report.comparisons]
    assert names[-2:] == [f"dkerple_{kernel}[0]", f"dkerple_{kernel}[1]"]


def test_gradient_of_r2_at_distance_zero_is_finite() -> None:
    """``d/dr2 0^r2`` would be ``0 * log 0``; torch defines it as 0, which keeps the power
    kernel's gradient finite on the diagonal."""
    bias = positional.kerple(2, "power")
    bias.dense(4, 4).sum().backward()
    assert torch.isfinite(bias.r2_raw.grad).all() and (bias.r2_raw.grad != 0).all()


@pytest.mark.parametrize("kernel", ["log", "power"])
def test_runs_in_flex(kernel, backend_context) -> None:
    q, k, v = CASES["self_odd_63"].make(requires_grad=False)
    bias = positional.kerple(4, kernel, r1=R1, r2=R2[kernel], requires_grad=False)
    with backend_context("flex"):
        check_against_reference(
            partial(attnkit.attention, backend="flex"),
            q,
            k,
            v,
            grads=False,
            bias=bias,
            mask=masks.causal(),
        ).assert_ok()


def test_rejects_bad_parameters() -> None:
    with pytest.raises(
        ValueError, match="unknown KERPLE kernel 'cubic'; choose one of: power, log"
    ):
        positional.kerple(4, "cubic")
    with pytest.raises(ValueError, match="power kernel needs 0 < r2 < 2"):
        positional.kerple(2, "power", r2=torch.tensor([1.0, 2.5]))
    with pytest.raises(ValueError, match="log kernel needs r2 > 0"):
        positional.kerple(2, "log", r2=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="r1 must be > 0"):
        positional.kerple(2, r1=torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match=r"r1 must have shape \[3\], got \(2,\)"):
        positional.kerple(3, r1=torch.ones(2))
    with pytest.raises(ValueError, match="must both be \\[H\\]"):
        positional.Kerple("log", torch.ones(3), torch.ones(2))
