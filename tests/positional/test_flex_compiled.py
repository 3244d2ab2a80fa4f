"""The new biases through compiled FlexAttention (each compiles for seconds: marked slow; the
default suite checks them under ``flex.eager()``)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnkit
from attnkit import masks, positional
from attnkit.testing import Case, check_against_reference

BIASES = {
    "t5_causal": lambda: positional.t5_bias(4, 32, 128, False, table=torch.randn(32, 4)),
    "kerple_log": lambda: positional.kerple(4, "log", requires_grad=False),
    "kerple_power": lambda: positional.kerple(4, "power", requires_grad=False),
    "grid_position": lambda: positional.GridPositionBias(positional.locality_init(4), (16, 16)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BIASES))
def test_compiled_flex_matches_reference(name: str) -> None:
    q, k, v = Case("c", B=1, Tq=256, Tk=256, Hq=4, Hkv=4, D=32).make(requires_grad=False)
    check_against_reference(
        partial(attnkit.attention, backend="flex"),
        q,
        k,
        v,
        grads=False,
        bias=BIASES[name](),
        mask=masks.causal(),
    ).assert_ok()
