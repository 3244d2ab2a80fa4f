"""Gated attention output (Qiu et al., 2025): the gate against its head-by-head reference."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import attnkit
from attnkit import masks
from attnkit.testing import CASES, check_function
from attnkit.variants import OutputGate, gate_output, gate_output_reference

B, T, H, DV, C = 2, 37, 4, 16, 24


def draw(*shape: int, dtype=torch.float32, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + shift).to(dtype)


@pytest.mark.parametrize("width", [1, DV], ids=["headwise", "elementwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_output_matches_reference_forward_and_backward(width: int, dtype) -> None:
    inputs = {
        "out": draw(B, T, H, DV, dtype=dtype, seed=1, shift=0.3),
        "gate_logits": draw(B, T, H, width, dtype=dtype, seed=2, shift=-0.5),
    }
    check_function(gate_output, gate_output_reference, inputs).assert_ok()


def test_headwise_gate_scales_each_head_by_one_number() -> None:
    out = draw(B, T, H, DV, dtype=torch.float64, seed=1)
    logits = draw(B, T, H, 1, dtype=torch.float64, seed=2)
    ratio = gate_output(out, logits) / out
    torch.testing.assert_close(ratio, torch.sigmoid(logits).expand_as(ratio))


@pytest.mark.parametrize("kind", ["headwise", "elementwise"])
def test_output_gate_module_forward_and_backward(kind: str) -> None:
    gate = OutputGate(C, H, DV, kind=kind, bias=True)
    width = 1 if kind == "headwise" else DV

    def module(x, out, weight, bias):
        return functional_call(gate, {"proj.weight": weight, "proj.bias": bias}, (x, out))

    def reference(x, out, weight, bias):
        logits = (x @ weight.T + bias).view(B, T, H, width)
        return gate_output_reference(out, logits)

    inputs = {
        "x": draw(B, T, C, seed=3),
        "out": draw(B, T, H, DV, seed=4),
        "weight": gate.proj.weight.detach().clone(),
        "bias": gate.proj.bias.detach().clone(),
    }
    check_function(module, reference, inputs).assert_ok()


def test_gate_at_plus_infinity_is_plain_attention() -> None:
    """sigmoid(100) == 1 in float32: zero weights and a large bias leave attention unchanged."""
    q, k, v = CASES["gqa_8_2"].make(torch.float32, requires_grad=False)
    out = attnkit.attention(q, k, v, mask=masks.causal())
    x = draw(1, 48, C, seed=5)
    for kind in ("headwise", "elementwise"):
        gate = OutputGate(C, 8, 32, kind=kind, bias=True)
        with torch.no_grad():
            gate.proj.weight.zero_()
            gate.proj.bias.fill_(100.0)
        assert torch.equal(gate(x, out), out)


def test_gate_widths_and_default_bias() -> None:
    assert OutputGate(C, H, DV).proj.out_features == H
    assert OutputGate(C, H, DV, kind="elementwise").proj.out_features == H * DV
    assert OutputGate(C, H, DV).proj.bias is None  # as the authors' query projection


def test_bad_gate_inputs_raise() -> None:
    out = draw(B, T, H, DV)
    with pytest.raises(ValueError, match=r"\[B, T, H, 1\] \(head-wise\)"):
        gate_output(out, draw(B, T, H, 3))
    with pytest.raises(ValueError, match="4-D"):
        gate_output(out, draw(B, T, H))
    with pytest.raises(ValueError, match="unknown gate kind 'channel'"):
        OutputGate(C, H, DV, kind="channel")
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        OutputGate(C, 0, DV)
    gate = OutputGate(C, H, DV)
    with pytest.raises(ValueError, match=r"expects x \[B, T, 24\]"):
        gate(draw(B, T, C + 1), out)
    with pytest.raises(ValueError, match=r"built for out \[B, T, 4, 16\]"):
        gate(draw(B, T, C), draw(B, T, H, DV + 1))
