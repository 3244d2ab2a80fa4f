"""Every new pattern kind through compiled FlexAttention (forward: flex has no CPU backward).
Each compiles for seconds, so these are marked slow; the default suite runs the same mask_mod
and BlockMask through ``flex.eager()`` in the pattern test files."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.testing import Case, check_against_reference

PATTERNS = {
    "neighborhood_2d_dilated_causal": lambda: masks.neighborhood(
        (3, 5), (8, 8), dilation=(2, 1), causal=(True, False)
    ),
    "gna_3d_strided": lambda: masks.neighborhood((2, 3, 3), (4, 4, 4), stride=(1, 3, 2)),
    "halo_2d": lambda: masks.halo(4, 1, (8, 8)),
    "block_causal": lambda: masks.block_causal(8),
    "chunked_causal": lambda: masks.chunked(16, causal=True),
    "scca_flow": lambda: masks.scca(16, 8, "flow"),
    "longlora": lambda: masks.longlora_shift(16, 8),
    "s2_attention": lambda: masks.s2_attention(8, 8, 2, 4, num_kv_heads=2),
    "power_attention": lambda: masks.power_attention(4, sink_blocks=1),
    "dilated_window": lambda: masks.dilated_window(4, 4, dilation=3),
    "strided": lambda: masks.strided(5) | masks.sliding_window(4),
    "global_tokens": lambda: masks.sliding_window(3, 3) | masks.global_tokens([0, 17]),
    "per_head": lambda: masks.per_head(
        [masks.causal(), masks.chunked(8), masks.neighborhood(5, dilation=2), masks.full()] * 2
    ),
    "moa_windows": lambda: masks.windows_per_head([1, 2, 4, 8, 16, 32, 64, 9]),
    "duo": lambda: masks.duo(torch.tensor([True, False] * 4), 4, 8),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PATTERNS))
def test_compiled_flex_matches_reference(name: str) -> None:
    q, k, v = Case("flex_64", B=1, Tq=64, Tk=64, Hq=8, Hkv=2, D=16).make(requires_grad=False)
    run = partial(attnkit.attention, backend="flex")
    check_against_reference(run, q, k, v, grads=False, mask=PATTERNS[name]()).assert_ok()
