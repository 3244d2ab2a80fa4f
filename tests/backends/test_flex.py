"""The flex backend: analytic BlockMasks, composed score_mods, the CPU lse anchor, refusals and
compilation hygiene. Compiled cases are few (each new variant compiles for seconds); the broad
matrix runs FlexAttention uncompiled under ``flex.eager()``."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

import attnkit
from attnkit import Aux, masks, positional, scores
from attnkit.backends import flex
from attnkit.call import AttentionCall
from attnkit.testing import CASES, Case, check_against_reference

SEGMENTS_B2_T300 = torch.tensor([[0] * 100 + [1] * 60 + [2] * 140, [0] * 30 + [1] * 200 + [2] * 70])


def check_flex(case: Case, dtype: torch.dtype = torch.float32, **options) -> None:
    q, k, v = case.make(dtype, requires_grad=False)
    report = check_against_reference(
        attnkit.attention, q, k, v, grads=False, backend="flex", **options
    )
    report.assert_ok()


# -- compiled: one case per representative path --------------------------------------------


def test_compiled_causal_gqa_odd_head_dims():
    check_flex(Case("c", B=1, Tq=200, Tk=200, Hq=4, Hkv=2, D=33, Dv=48), mask=masks.causal())


def test_compiled_sliding_window_or_sinks():
    case = Case("w", B=1, Tq=300, Tk=300, Hq=4, Hkv=4, D=32)
    check_flex(case, mask=masks.sliding_window(60) | masks.sinks(4))


def test_compiled_documents_batch_dependent():
    case = Case("d", B=2, Tq=300, Tk=300, Hq=4, Hkv=4, D=32)
    check_flex(case, mask=masks.documents(SEGMENTS_B2_T300) & masks.causal())


def test_compiled_sigmoid_alibi_with_lse_from_the_anchor_key():
    # Tk a multiple of 128: the anchor key opens a new kv tile; Tq is not a multiple.
    case = Case("s", B=1, Tq=200, Tk=256, Hq=4, Hkv=4, D=32)
    options = dict(mask=masks.causal(), score=scores.sigmoid(), bias=positional.alibi(4))
    check_flex(case, **options)
    q, k, v = case.make(requires_grad=False)
    _, got = attnkit.attention(q, k, v, backend="flex", aux=Aux(lse=True), **options)
    _, want = attnkit.attention(q, k, v, backend="reference", aux=Aux(lse=True), **options)
    torch.testing.assert_close(got.lse, want.lse, atol=2e-5, rtol=0)  # natural log


def test_compiled_softplus_l1_with_row_counts():
    case = Case("p", B=2, Tq=200, Tk=200, Hq=4, Hkv=4, D=32)
    mask = masks.prefix_lm(torch.tensor([10, 150]))
    check_flex(case, mask=mask, score=scores.softplus_l1())


def test_compiled_fully_masked_rows_give_zero():
    q, k, v = Case("z", B=2, Tq=150, Tk=150, Hq=2, Hkv=2, D=32).make(requires_grad=False)
    mask = masks.key_padding(torch.tensor([60, 0]))
    out = attnkit.attention(q, k, v, mask=mask, backend="flex")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, attnkit.attention(q, k, v, mask=mask, backend="reference"))


def test_compiled_head_dim_16_with_an_8_key_tail_tile(formula):
    # torch 2.13 on 256-bit vectors (AVX2; ATEN_CPU_CAPABILITY=avx2 forces it): with head dim
    # 16 and Tk % 16 == 8, the kernel's q @ k^T read 8 keys past the tile and wrote their
    # scores over the running maxima of query rows 0-7 (flex._widen_small_heads). k and v are
    # views into a longer cache whose unwritten slots hold NaN, so the fault shows every time
    # (NaN rows) instead of depending on the memory past the tensors.
    B, T, H, D = 2, 40, 2, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g)
    cache = torch.full((2, B, T + 8, H, D), float("nan"))
    cache[:, :, :T] = torch.randn(2, B, T, H, D, generator=g)
    k, v = cache[0, :, :T], cache[1, :, :T]
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 20:25] = False
    mask = masks.keys(keep) & masks.causal()
    out = attnkit.attention(q, k, v, mask=mask, backend="flex")
    expected = formula(q, k, v, allowed=mask.dense(T, T))
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)


def test_compiled_fast_path_survives_grad_mode_switches():
    q, k, v = Case("c", B=1, Tq=200, Tk=200, Hq=4, Hkv=2, D=33, Dv=48).make(requires_grad=False)
    attnkit.attention(q, k, v, mask=masks.causal(), backend="flex")  # compiled (or cached)
    graphs = counters["stats"]["unique_graphs"]
    for step in range(6):
        with torch.set_grad_enabled(step % 2 == 1):
            # fresh mask objects each call: the reused mask_mod code must not recompile either
            attnkit.attention(q, k, v, mask=masks.causal(), backend="flex")
    assert counters["stats"]["unique_graphs"] == graphs


def test_hitting_the_recompile_limit_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(flex, "RECOMPILE_LIMIT", 1)
    q, k, v = Case("c", B=1, Tq=200, Tk=200, Hq=4, Hkv=2, D=33, Dv=48).make(requires_grad=False)
    attnkit.attention(q, k, v, mask=masks.causal(), backend="flex")
    # head dims no other test uses: a variant that must compile
    q2, k2, v2 = Case("n", B=1, Tq=77, Tk=77, Hq=2, Hkv=2, D=24).make(requires_grad=False)
    with pytest.raises(RuntimeError, match="refuses to fall back silently"):
        attnkit.attention(q2, k2, v2, mask=masks.causal(), backend="flex")


# -- eager: the broad matrix -----------------------------------------------------------------

LENGTHS_B2 = torch.tensor([150, 77])
EAGER_CASES = [
    ("causal_self_odd", CASES["self_odd_63"], dict(mask=masks.causal())),
    ("causal_cross", CASES["cross_17x65_b2"], dict(mask=masks.causal())),
    ("gqa_8_2_window", CASES["gqa_8_2"], dict(mask=masks.sliding_window(7))),
    ("mqa_noncausal_window", CASES["mqa_b2"], dict(mask=masks.sliding_window(5, 5))),
    ("odd_head_dim", CASES["odd_head_dim_33"], dict(mask=masks.causal())),
    ("value_dim_48", CASES["value_dim_48"], dict(mask=masks.causal())),
    ("decode", CASES["decode_1x70"], dict(mask=masks.causal() & masks.sliding_window(20))),
    ("no_mask", Case("n", B=1, Tq=130, Tk=200, Hq=2, Hkv=1, D=16), dict()),
    ("full", Case("f", B=1, Tq=130, Tk=200, Hq=2, Hkv=1, D=16), dict(mask=masks.full())),
    ("not_causal", Case("x", B=1, Tq=130, Tk=130, Hq=2, Hkv=2, D=16), dict(mask=~masks.causal())),
    (
        "prefix_lm",
        Case("p", B=2, Tq=200, Tk=200, Hq=2, Hkv=2, D=16),
        dict(mask=masks.prefix_lm(torch.tensor([10, 150]))),
    ),
    (
        "key_padding_right",
        Case("k", B=2, Tq=100, Tk=150, Hq=2, Hkv=2, D=16),
        dict(mask=masks.key_padding(LENGTHS_B2, "right")),
    ),
    (
        "key_padding_left_causal",
        Case("k", B=2, Tq=100, Tk=150, Hq=2, Hkv=2, D=16),
        dict(mask=masks.key_padding(LENGTHS_B2, "left") & masks.causal()),
    ),
    (
        "documents_cu_seqlens",
        Case("d", B=1, Tq=300, Tk=300, Hq=2, Hkv=2, D=16),
        dict(mask=masks.documents(cu_seqlens=torch.tensor([0, 130, 131, 300]))),
    ),
    (
        "window_or_sinks_256",
        Case("w", B=1, Tq=256, Tk=256, Hq=2, Hkv=2, D=16),
        dict(mask=masks.causal() & (masks.sliding_window(40) | masks.sinks(4))),
    ),
    (
        "sigmoid_documents_softcap",
        Case("s", B=2, Tq=300, Tk=300, Hq=2, Hkv=2, D=16),
        dict(mask=masks.documents(SEGMENTS_B2_T300), score=scores.sigmoid(softcap=5.0)),
    ),
    (
        "sigmoid_no_mask",
        Case("s", B=1, Tq=100, Tk=128, Hq=2, Hkv=2, D=16),
        dict(score=scores.sigmoid()),
    ),
    (
        "softplus_l1_no_mask",
        Case("p", B=1, Tq=100, Tk=100, Hq=2, Hkv=2, D=16),
        dict(score=scores.softplus_l1()),
    ),
    (
        "softcap_relative_bias",
        Case("r", B=1, Tq=90, Tk=200, Hq=4, Hkv=2, D=16),
        dict(
            mask=masks.causal(),
            score=scores.softcap(20.0),
            bias=positional.relative_bias(4, 16, table=torch.randn(4, 33)),
        ),
    ),
]


@pytest.mark.parametrize(("label", "case", "options"), EAGER_CASES, ids=[c[0] for c in EAGER_CASES])
def test_eager_matches_reference(label, case, options):
    with flex.eager():
        check_flex(case, **options)


#: Low and high precision on the paths that differ by dtype: plain, batch-dependent mask,
#: the anchor key (computed in float32 for half inputs), bias and row counts.
PRECISION_CASES = [
    "causal_cross",
    "key_padding_left_causal",
    "sigmoid_documents_softcap",
    "softplus_l1_no_mask",
    "softcap_relative_bias",
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("label", PRECISION_CASES)
def test_eager_matches_reference_in_bf16_and_fp64(label, dtype):
    _, case, options = next(c for c in EAGER_CASES if c[0] == label)
    with flex.eager():
        check_flex(case, dtype, **options)


@pytest.mark.parametrize("score", [scores.softmax(), scores.sigmoid()], ids=lambda s: s.name)
def test_eager_fully_masked_rows_give_zero_and_minus_inf_lse(score):
    q, k, v = Case("z", B=2, Tq=200, Tk=100, Hq=2, Hkv=2, D=16).make(requires_grad=False)
    # batch 1 sees no key at all; with Tq > Tk the first 100 queries precede every key
    mask = masks.key_padding(torch.tensor([60, 0])) & masks.causal()
    aux = Aux(lse=True) if score.name == "sigmoid" else None
    with flex.eager():
        result = attnkit.attention(q, k, v, mask=mask, score=score, backend="flex", aux=aux)
    out = result[0] if aux else result
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :100], torch.zeros_like(out[0, :100]))
    want = attnkit.attention(q, k, v, mask=mask, score=score, backend="reference")
    torch.testing.assert_close(out, want)
    if aux:
        lse = result[1].lse
        assert lse.dtype == torch.float32 and lse.shape == (2, 200, 2)
        assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :100]).all()
        assert torch.isfinite(lse[0, 100:]).all()


# -- refusals ----------------------------------------------------------------------------------


def _call(requires_grad: bool = False, dtype=torch.float32, **options) -> AttentionCall:
    q, k, v = CASES["gqa_8_2"].make(dtype, requires_grad=requires_grad)
    return AttentionCall(q, k, v, **options)


def test_refuses_cpu_training_and_attention_says_who_can():
    assert "no backward pass on the CPU" in flex.BACKEND.supports(_call(requires_grad=True))
    q, k, v = CASES["gqa_8_2"].make()
    with pytest.raises(ValueError, match="no backward pass on the CPU") as error:
        attnkit.attention(q, k, v, mask=masks.causal(), backend="flex")
    assert "Backends that can: reference" in str(error.value)
    with torch.no_grad():  # the same tensors are fine when no gradient is needed
        assert flex.BACKEND.supports(_call(requires_grad=True)) is None


def test_refuses_learnable_bias_with_grad_on_cpu():
    bias = positional.relative_bias(8, 4)  # trainable table
    assert "no backward" in flex.BACKEND.supports(_call(bias=bias))
    with torch.no_grad():
        assert flex.BACKEND.supports(_call(bias=bias)) is None


def test_float64_only_in_eager_mode():
    assert "not float64" in flex.BACKEND.supports(_call(dtype=torch.float64))
    with flex.eager():
        assert flex.BACKEND.supports(_call(dtype=torch.float64)) is None


def test_cpu_lse_only_where_the_anchor_key_is_exact():
    assert "no log-sum-exp" in flex.BACKEND.supports(_call(aux=Aux(lse=True)))
    assert "no log-sum-exp" in flex.BACKEND.supports(
        _call(aux=Aux(lse=True), score=scores.softplus_l1())
    )
    for score in (scores.sigmoid(), scores.softcap(50.0)):
        assert flex.BACKEND.supports(_call(aux=Aux(lse=True), score=score)) is None


# -- BlockMask and caches ----------------------------------------------------------------------

BLOCK_MASK_CASES = [
    ("causal", masks.causal(), 384, 384),
    ("causal_cross", masks.causal(), 256, 512),
    ("window_or_sinks", masks.sliding_window(100) | masks.sinks(4), 512, 512),
    (
        "documents_b2",
        masks.documents(torch.tensor([[0] * 128 + [1] * 128 + [2] * 256, [0] * 256 + [1] * 256]))
        & masks.causal(),
        512,
        512,
    ),
    ("key_padding_left", masks.key_padding(torch.tensor([256, 129]), "left"), 256, 512),
    ("prefix_lm", masks.prefix_lm(torch.tensor([10, 300])), 512, 512),
    ("not_causal", ~masks.causal(), 256, 256),
]


def _full_tiles(block_mask: BlockMask) -> torch.Tensor:
    return BlockMask.from_kv_blocks(
        block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    ).to_dense()


@pytest.mark.parametrize(
    ("label", "mask", "Tq", "Tk"), BLOCK_MASK_CASES, ids=[c[0] for c in BLOCK_MASK_CASES]
)
def test_analytic_block_mask_equals_create_block_mask(label, mask, Tq, Tk):
    ours = flex.build_block_mask(mask, Tq, Tk, "cpu")
    theirs = create_block_mask(
        mask.mask_mod(Tq, Tk), mask.batch_size, mask.num_heads, Tq, Tk, "cpu"
    )
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(_full_tiles(ours), _full_tiles(theirs))


def test_block_mask_at_ragged_sizes_keeps_every_live_tile():
    # create_block_mask calls short edge tiles partial; ours may call them full. Live sets agree.
    mask, T = masks.causal() & masks.sliding_window(150), 300
    ours = flex.build_block_mask(mask, T, T, "cpu")
    theirs = create_block_mask(mask.mask_mod(T, T), 1, 1, T, T, "cpu")
    assert ours.seq_lengths == (T, T)
    assert torch.equal(ours.to_dense(), theirs.to_dense())


def test_block_masks_and_score_mods_are_cached_per_call_shape():
    mask = masks.causal()
    first = flex.cached_block_mask(mask, 200, 200, torch.device("cpu"))
    assert flex.cached_block_mask(mask, 200, 200, torch.device("cpu")) is first
    assert flex.build_block_mask(mask, 200, 200, "cpu") is not first
    assert flex.cached_block_mask(None, 200, 200, torch.device("cpu")) is None
    bias = positional.alibi(8)
    score_mod = flex.score_mod_for(_call(bias=bias, mask=mask))
    assert flex.score_mod_for(_call(bias=bias, mask=mask)) is score_mod
    assert flex.score_mod_for(_call(mask=mask)) is None  # plain softmax: no score_mod
