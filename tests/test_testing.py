"""The correctness kit itself: it passes the reference and catches wrong implementations."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import _alloc, masks, positional, testing
from attnkit.testing import CAB_PATTERNS, CASES, check_against_reference, check_causality

reference = partial(attnkit.attention, backend="reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["gqa_8_2", "cross_17x65_b2", "value_dim_48"])
def test_reference_passes_itself(case: str, dtype: torch.dtype) -> None:
    q, k, v = CASES[case].make(dtype)
    report = check_against_reference(reference, q, k, v, mask=masks.causal())
    report.assert_ok()
    assert [c.name for c in report.comparisons] == ["out", "dq", "dk", "dv"]
    assert report.dtype == dtype


def test_sdpa_passes_in_bfloat16() -> None:
    q, k, v = CASES["mqa_b2"].make(torch.bfloat16)
    check_against_reference(
        partial(attnkit.attention, backend="sdpa"), q, k, v, mask=masks.sliding_window(5)
    ).assert_ok()


def forgets_the_scale(q, k, v, **options):
    return reference(q, k, v, **{**options, "scale": 1.0})


def drops_the_mask(q, k, v, **options):
    options.pop("mask", None)
    return reference(q, k, v, **options)


def tiles_gqa_heads(q, k, v, **options):
    """Expands k/v heads as [0, 1, 0, 1, ...] instead of [0, 0, 1, 1, ...]."""
    groups = q.shape[2] // k.shape[2]
    return reference(q, k.repeat(1, 1, groups, 1), v.repeat(1, 1, groups, 1), **options)


def wrong_value_gradient(q, k, v, **options):
    """Right output, but no gradient reaches v (a detached value)."""
    return reference(q, k, v.detach(), **options)


def top_left_causal(q, k, v, **options):
    """Passes ``is_causal`` straight to SDPA: top-left alignment, wrong for Tq < Tk."""
    options.pop("mask")
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    ("wrong", "case"),
    [
        (forgets_the_scale, "self_odd_63"),
        (drops_the_mask, "self_odd_63"),
        (tiles_gqa_heads, "gqa_8_2"),
        (wrong_value_gradient, "cross_17x65_b2"),
        (top_left_causal, "cross_17x65_b2"),
    ],
    ids=["no_scale", "no_mask", "gqa_tiled", "no_dv", "top_left_causal"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kit_catches_wrong_implementations(wrong, case: str, dtype: torch.dtype) -> None:
    q, k, v = CASES[case].make(dtype)
    report = check_against_reference(wrong, q, k, v, mask=masks.causal())
    assert not report.ok
    with pytest.raises(AssertionError, match="beyond 2x its error"):
        report.assert_ok()
    assert "NO" in str(report)


def test_kit_catches_a_silent_loss_of_precision() -> None:
    """A float32 call computed in half precision inside: every number is "roughly right"."""

    def computes_in_float16(q, k, v, **options):
        return reference(q.half(), k.half(), v.half(), **options).float()

    q, k, v = CASES["gqa_8_2"].make(torch.float32)
    report = check_against_reference(computes_in_float16, q, k, v, mask=masks.causal())
    assert not any(c.ok for c in report.comparisons)


def test_kit_pinpoints_the_wrong_tensor() -> None:
    q, k, v = CASES["cross_17x65_b2"].make(torch.float32)
    report = check_against_reference(wrong_value_gradient, q, k, v, mask=masks.causal())
    verdict = {c.name: c.ok for c in report.comparisons}
    assert verdict == {"out": True, "dq": True, "dk": True, "dv": False}


def test_kit_checks_bias_parameter_gradients() -> None:
    q, k, v = CASES["mqa_b2"].make(torch.float32)
    bias = positional.relative_bias(4, 5, generator=torch.Generator().manual_seed(0))

    def detaches_the_table(q, k, v, **options):
        frozen = positional.relative_bias(4, 5, table=options.pop("bias").table.detach())
        return reference(q, k, v, bias=frozen, **options)

    good = check_against_reference(reference, q, k, v, bias=bias, mask=masks.causal())
    good.assert_ok()
    bad = check_against_reference(detaches_the_table, q, k, v, bias=bias, mask=masks.causal())
    verdict = {c.name: c.ok for c in bad.comparisons}
    assert verdict == {"out": True, "dq": True, "dk": True, "dv": True, "drelative_bias[0]": False}


def test_float32_bias_gradient_in_a_float64_call_gets_the_float32_floor() -> None:
    """Accumulating a float32 table's gradient in float64 (then rounding once) is more precise
    than the golden's float32 accumulation; the kit must not call that wrong."""
    q, k, v = CASES["cross_17x65_b2"].make(torch.float64)
    bias = positional.relative_bias(4, 8, generator=torch.Generator().manual_seed(0))

    def accumulates_in_float64(q, k, v, **options):
        table = options.pop("bias").table.double()  # differentiable cast back to the leaf
        return reference(q, k, v, bias=positional.relative_bias(4, 8, table=table), **options)

    report = check_against_reference(
        accumulates_in_float64, q, k, v, bias=bias, mask=masks.causal()
    )
    report.assert_ok()
    assert report.comparisons[-1].bound > 1e-7 > report.comparisons[0].bound


def test_kit_without_grads_checks_only_the_output() -> None:
    q, k, v = CASES["decode_1x70"].make(torch.float32, requires_grad=False)
    report = check_against_reference(reference, q, k, v, grads=False, mask=masks.causal())
    report.assert_ok()
    assert [c.name for c in report.comparisons] == ["out"]


def test_nan_filled_outputs_fills_and_restores() -> None:
    assert not _alloc.FILL_NAN
    assert not torch.isnan(_alloc.empty(4, dtype=torch.float32, device=torch.device("cpu"))).all()
    with testing.nan_filled_outputs():
        assert torch.isnan(
            _alloc.empty(3, 4, dtype=torch.float32, device=torch.device("cpu"))
        ).all()
        with testing.nan_filled_outputs():
            pass
        assert _alloc.FILL_NAN, "nested blocks restore the outer state"
    assert not _alloc.FILL_NAN


def test_nan_filled_outputs_restores_after_an_error() -> None:
    with pytest.raises(RuntimeError), testing.nan_filled_outputs():
        raise RuntimeError("kernel failed")
    assert not _alloc.FILL_NAN


def test_kit_catches_a_kernel_that_leaves_rows_unwritten() -> None:
    def forgets_the_last_row(q, k, v, **options):
        full = reference(q, k, v, **options)
        out = _alloc.empty(*full.shape, dtype=full.dtype, device=full.device)
        out[:, :-1] = full[:, :-1].detach()
        return out

    q, k, v = CASES["self_odd_63"].make(torch.float32, requires_grad=False)
    report = check_against_reference(forgets_the_last_row, q, k, v, grads=False)
    assert not report.ok
    assert "nan" in str(report).lower()


@pytest.mark.parametrize(
    ("label", "case", "causal"), CAB_PATTERNS, ids=[p[0] for p in CAB_PATTERNS]
)
def test_check_causality(label: str, case, causal: bool) -> None:
    q, k, v = case.make(torch.float32, requires_grad=False)
    cut = case.Tk - 3
    if causal:
        check_causality(reference, q, k, v, cut=cut, mask=masks.causal())
        with pytest.raises(AssertionError, match="leaks the future"):
            check_causality(drops_the_mask, q, k, v, cut=cut, mask=masks.causal())
    else:
        with pytest.raises(AssertionError, match="leaks the future"):
            check_causality(reference, q, k, v, cut=cut)


def test_check_causality_needs_a_query_before_the_cut() -> None:
    q, k, v = CASES["cross_17x65_b2"].make(torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="no query lies before cut=10"):
        check_causality(reference, q, k, v, cut=10, mask=masks.causal())


def test_cases_are_seeded_asymmetric_and_shaped() -> None:
    for case in CASES.values():
        q, k, v = case.make(torch.float32, requires_grad=False)
        assert q.shape == (case.B, case.Tq, case.Hq, case.D)
        assert k.shape == (case.B, case.Tk, case.Hkv, case.D)
        assert v.shape == (case.B, case.Tk, case.Hkv, case.Dv or case.D)
        assert case.Hq % case.Hkv == 0
    q1, _, _ = CASES["gqa_8_2"].make(torch.float32, seed=3)
    q2, _, _ = CASES["gqa_8_2"].make(torch.float32, seed=3)
    assert torch.equal(q1, q2) and q1.requires_grad
    q, k, v = CASES["long_1025"].make(torch.float64)
    assert q.mean() > 0.2 and k.mean() < -0.1 and v.mean() > 0.4, "shifted means"
    head_std = q.std(dim=(0, 1, 3))
    assert head_std[-1] > 2 * head_std[0], "per-head scales"
    plain, _, _ = CASES["long_1025"].make(torch.float64, asymmetric=False)
    assert abs(plain.mean()) < 0.05


def test_cases_cover_cross_decode_mqa_gqa_odd_dims_batches_and_cab() -> None:
    cases = list(CASES.values())
    assert any(c.Tq != c.Tk for c in cases) and any(c.Tq == 1 for c in cases)
    assert any(c.Hkv == 1 and c.Hq > 1 for c in cases), "MQA"
    assert any(c.Hq == 8 and c.Hkv == 2 for c in cases), "GQA 8:2"
    assert any(c.D % 2 for c in cases), "odd head dim"
    assert any(c.B > 1 for c in cases) and any(c.Tq == 1025 for c in cases)
    assert {label for label, _, _ in CAB_PATTERNS} == {
        "causal_self",
        "noncausal_self",
        "causal_cross",
        "noncausal_cross",
    }


def test_check_function_accepts_an_equal_function_and_rejects_a_wrong_one():
    x, w = torch.randn(3, 5), torch.randn(5, 4)

    def reference(x, w):
        return (x[:, :, None] * w).sum(1)

    report = testing.check_function(lambda x, w: x @ w, reference, {"x": x, "w": w})
    assert [c.name for c in report.comparisons] == ["out", "dx", "dw"]
    report.assert_ok()
    wrong = testing.check_function(lambda x, w: x @ w + 1e-3, reference, {"x": x, "w": w})
    assert not wrong.ok


def test_check_function_skips_integer_inputs_and_needs_a_float_one():
    x, idx = torch.randn(6), torch.tensor([0, 2])
    report = testing.check_function(
        lambda x, idx: x[idx], lambda x, idx: x[idx], {"x": x, "idx": idx}
    )
    assert [c.name for c in report.comparisons] == ["out", "dx"]
    with pytest.raises(ValueError, match="floating-point"):
        testing.check_function(lambda idx: idx, lambda idx: idx, {"idx": idx})
