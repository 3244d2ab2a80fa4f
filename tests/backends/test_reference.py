"""The oracle: the reference backend equals the operator written out from scratch in float64."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import Aux, masks
from attnkit.backends import BACKENDS
from attnkit.backends.reference import reference_forward
from attnkit.call import AttentionCall
from attnkit.testing import CASES


def causal_allowed(Tq: int, Tk: int) -> torch.Tensor:
    return torch.arange(Tk).view(1, -1) <= torch.arange(Tq).view(-1, 1) + (Tk - Tq)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_equals_the_formula(case: str, causal: bool, formula) -> None:
    c = CASES[case]
    q, k, v = c.make(torch.float64, requires_grad=False)
    mask = masks.causal() if causal else None
    out, aux = attnkit.attention(q, k, v, mask=mask, backend="reference", aux=Aux(lse=True))
    allowed = causal_allowed(c.Tq, c.Tk) if causal else None
    torch.testing.assert_close(out, formula(q, k, v, allowed=allowed))
    groups = c.Hq // c.Hkv
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(groups, dim=2)) / math.sqrt(c.D)
    if causal:
        s = s.masked_fill(~allowed, float("-inf"))
    assert aux.lse.dtype == torch.float64
    torch.testing.assert_close(aux.lse, torch.logsumexp(s, dim=-1).transpose(1, 2))


def test_explicit_scale_is_used(formula) -> None:
    q, k, v = CASES["odd_head_dim_33"].make(torch.float64, requires_grad=False)
    out = attnkit.attention(q, k, v, scale=0.7, backend="reference")
    torch.testing.assert_close(out, formula(q, k, v, scale=0.7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype, formula) -> None:
    q, k, v = CASES["gqa_8_2"].make(dtype, requires_grad=False)
    call = AttentionCall(q, k, v, masks.causal())
    out, lse = reference_forward(call)
    assert out.dtype == dtype and lse.dtype == torch.float32
    exact = formula(q, k, v, allowed=causal_allowed(48, 48))
    error = (out.double() - exact).abs().max().item()
    # float32 math then one rounding to the half type: within one unit of the output's precision
    assert error <= torch.finfo(dtype).eps * exact.abs().max().item()
    same_precision, _ = reference_forward(call, compute_dtype=dtype)
    assert (same_precision.double() - exact).abs().max().item() > error


def test_fully_masked_rows_give_zero_and_minus_infinite_lse() -> None:
    q, k, v = CASES["cross_17x65_b2"].make(torch.float32)
    mask = masks.sliding_window(2) & masks.key_padding(torch.tensor([65, 10]))
    out, aux = attnkit.attention(q, k, v, mask=mask, backend="reference", aux=Aux(lse=True))
    dead = ~mask.dense(17, 65).any(-1)[:, 0]  # [B, Tq]: rows that see no key
    assert dead[1].all() and not dead[0].any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(aux.lse[1]).all() and torch.isfinite(aux.lse[0]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_reference_accepts_every_call() -> None:
    q, k, v = CASES["decode_1x70"].make(torch.bfloat16)
    assert BACKENDS["reference"].supports(AttentionCall(q, k, v, masks.causal())) is None
    assert "oracle" in BACKENDS["reference"].summary
