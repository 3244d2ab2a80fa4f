"""auto's choices on machines these tests do not run on: synthetic cost tables injected with
``calibration.using``, so no assertion depends on the machine that runs it."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import calibration, masks, positional, scores
from attnkit.costs import FACTORS, CostTable, conservative_table
from attnkit.machine import Capabilities

AVX512_BF16 = Capabilities(
    "cpu",
    "an AVX-512 CPU",
    "AVX512",
    frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"}),
)
AVX2 = Capabilities("cpu", "an AVX2 CPU", "AVX2", frozenset({"avx2", "fma"}))
H100 = Capabilities("cuda", "a GPU", "sm_90", frozenset(), (), (9, 0))


def _table(caps: Capabilities, **entries: float) -> CostTable:
    """A measured-looking table: ``name__dtype__grad=value`` (grad ``fwd`` or ``bwd``)."""
    parsed = {}
    for key, value in entries.items():
        name, dtype, grad = key.split("__")
        parsed[name.replace("_", ".", 1), dtype, grad == "bwd"] = value
    return CostTable(caps, "synthetic", parsed)


#: As fitted on a 2-core AVX-512 CPU with AVX512-BF16: the kernel on brgemm at ~0.5 of SDPA
#: in float32 and ~0.3 in bfloat16.
FAST_KERNEL = CostTable(AVX512_BF16, "synthetic", {})
#: An AVX2 CPU where the kernel's float32 GEMM (the BLAS) runs at SDPA's speed, and bfloat16
#: matmuls are emulated: chunked's bfloat16 matmuls are 25x SDPA's time.
AVX2_TABLE = _table(
    AVX2,
    blocksparse_per_live__float32__fwd=1.05,
    blocksparse_per_live__float32__bwd=1.1,
    chunked_per_live__bfloat16__fwd=25.0,
    chunked_per_live__bfloat16__bwd=25.0,
    chunked_dense__bfloat16__fwd=25.0,
    chunked_dense__bfloat16__bwd=25.0,
    flex_per_live__bfloat16__fwd=1.6,
)
GPU_TABLE = _table(H100, flex_per_live__bfloat16__fwd=1.2, flex_per_live__bfloat16__bwd=1.4)


def _choice(table: CostTable, T: int = 4096, dtype=torch.float32, q_len: int | None = None, **kw):
    x = torch.randn(1, T, 4, 64, dtype=dtype)
    q = x[:, -q_len:] if q_len else x
    with calibration.using(table):
        return attnkit.explain(q, x, x, **kw)


def test_a_fast_kernel_is_chosen_where_its_table_says_it_is_faster() -> None:
    window = masks.sliding_window(255)
    for dtype in (torch.float32, torch.bfloat16):
        assert _choice(FAST_KERNEL, dtype=dtype).chosen == "blocksparse"
        assert _choice(FAST_KERNEL, dtype=dtype, mask=masks.causal()).chosen == "blocksparse"
        assert _choice(FAST_KERNEL, dtype=dtype, mask=window).chosen == "blocksparse"
    neighborhood = masks.neighborhood((13, 13), (64, 64))
    assert _choice(FAST_KERNEL, mask=neighborhood).chosen == "blocksparse"
    capped = _choice(FAST_KERNEL, mask=masks.causal(), score=scores.softcap(30.0))
    assert capped.chosen == "blocksparse"
    # decoding: one query row, fixed costs dominate
    assert _choice(FAST_KERNEL, q_len=1, mask=masks.causal()).chosen == "sdpa"


def test_without_native_bfloat16_the_bf16_kernel_is_no_candidate_and_explain_says_why() -> None:
    for mask in (None, masks.causal(), masks.sliding_window(255)):
        explanation = _choice(AVX2_TABLE, dtype=torch.bfloat16, mask=mask)
        assert explanation.chosen != "blocksparse"
        reason = explanation.rejected["blocksparse"]
        assert reason.startswith("not a candidate here: bf16 kernel: this CPU has no AVX512-BF16")
        assert "emulated" in reason
        assert explanation.rejected["chunked"].startswith(f"ranked after {explanation.chosen}: ")
        assert explanation.chosen != "chunked"  # its bf16 matmuls are emulated too (25x)
    assert _choice(AVX2_TABLE, dtype=torch.bfloat16).chosen == "sdpa"
    assert _choice(AVX2_TABLE, dtype=torch.bfloat16, mask=masks.causal()).chosen == "sdpa"
    window = _choice(AVX2_TABLE, dtype=torch.bfloat16, mask=masks.sliding_window(255))
    assert window.chosen == "flex"
    # the same CPU in float32: the kernel on the BLAS is no faster than SDPA per pair
    assert _choice(AVX2_TABLE).chosen == "sdpa"
    assert _choice(AVX2_TABLE, mask=masks.causal()).chosen == "sdpa"
    assert _choice(AVX2_TABLE, mask=masks.sliding_window(255)).chosen == "blocksparse"


def test_on_cuda_the_cpu_kernel_is_never_a_candidate() -> None:
    for mask in (None, masks.causal(), masks.sliding_window(255)):
        explanation = _choice(GPU_TABLE, dtype=torch.bfloat16, mask=mask)
        assert explanation.chosen in ("sdpa", "flex", "chunked")
        assert "not a candidate on cuda" in explanation.rejected["blocksparse"]
    assert _choice(GPU_TABLE, dtype=torch.bfloat16, mask=masks.sliding_window(255)).chosen == "flex"
    assert _choice(GPU_TABLE, dtype=torch.bfloat16).chosen == "sdpa"


def test_the_conservative_table_keeps_dense_and_causal_on_sdpa() -> None:
    for caps in (AVX512_BF16, AVX2):
        table = conservative_table(caps)
        assert table.conservative
        for T in (1024, 4096, 16384):
            for dtype in (torch.float32, torch.bfloat16):
                assert _choice(table, T=T, dtype=dtype).chosen == "sdpa"
                assert _choice(table, T=T, dtype=dtype, mask=masks.causal()).chosen == "sdpa"
        # a narrow window skips enough tiles to leave SDPA even so
        window = _choice(table, T=4096, mask=masks.sliding_window(255))
        assert window.chosen in ("blocksparse", "flex")


def test_a_table_entry_overrides_the_fallback_factors_only_where_given() -> None:
    table = _table(AVX2, chunked_per_live__float32__bwd=7.0)
    assert table.value("chunked.per_live", torch.float32, True) == 7.0
    assert (
        table.value("chunked.per_live", torch.float32, False)
        == FACTORS["chunked.per_live", "*", False]
    )
    assert (
        table.value("chunked.per_live", "bfloat16", True) == FACTORS["chunked.per_live", "*", True]
    )
    assert table.measured("chunked.per_live", torch.float32, True)
    assert not table.measured("chunked.per_live", torch.float32, False)
    with pytest.raises(KeyError, match="no cost entry 'nonsense'"):
        table.value("nonsense", torch.float32, True)


def test_ranking_follows_the_table() -> None:
    """The same call flips between backends as their measured costs cross."""
    slow = _table(
        AVX512_BF16, blocksparse_per_live__float32__fwd=3.0, chunked_dense__float32__fwd=0.9
    )
    fast = _table(
        AVX512_BF16, blocksparse_per_live__float32__fwd=0.3, chunked_dense__float32__fwd=0.9
    )
    assert _choice(slow).chosen == "chunked"
    assert _choice(fast).chosen == "blocksparse"


def test_a_biased_call_weighs_sdpa_float_mask_against_flex() -> None:
    """A bias reaches SDPA as a float mask: its measured cost decides against Flex's."""
    alibi = positional.alibi(4)
    cheap_mask = _table(AVX2, sdpa_bias__bfloat16__fwd=1.1)
    dear_mask = _table(AVX2, sdpa_bias__bfloat16__fwd=2.5)
    options = {"mask": masks.causal(), "bias": alibi, "dtype": torch.bfloat16, "T": 1024}
    assert _choice(cheap_mask, **options).chosen == "sdpa"
    assert _choice(dear_mask, **options).chosen == "flex"


def query_position_bias(score, b, h, q_idx, kv_idx):
    return score + 0.01 * q_idx


def test_flex_fixed_cost_per_call_keeps_short_calls_elsewhere() -> None:
    table = _table(
        AVX512_BF16, sdpa_bias__bfloat16__fwd=1.1, flex_per_live__bfloat16__fwd=1.5,
        flex_score__bfloat16__fwd=1.0,
    )  # fmt: skip
    # a bias the block-sparse kernel does not add (not a function of the query-key offset)
    bias = positional.from_score_mod(query_position_bias, num_heads=4)
    options = {"mask": masks.causal(), "bias": bias, "dtype": torch.bfloat16}
    assert _choice(table, T=1024, **options).chosen == "sdpa"
    assert _choice(table, T=4096, **options).chosen == "flex"
