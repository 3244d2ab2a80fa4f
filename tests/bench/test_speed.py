"""The speed benchmark: counting, the baseline, verification gating ratios, and the report."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch

from attnkit import backends, catalog, masks
from attnkit.backends.base import Backend
from attnkit.bench import (
    Record,
    SpeedResults,
    quick_config,
    run_cell,
    run_speed_bench,
    targets,
    write_report,
)
from attnkit.bench.measure import paired_ratio, peak_rss_increase_mb
from attnkit.bench.speed import (
    allowed_pairs,
    attention_flops,
    baseline_attn_mask,
    baseline_label,
)


@pytest.fixture(autouse=True)
def uncompiled_flex():
    """Compiling FlexAttention costs seconds per shape; these tests time nothing real."""
    with getattr(backends.flex, "eager", contextlib.nullcontext)():
        yield


def test_causal_pairs_are_the_triangle() -> None:
    spec = catalog.InputSpec(B=3, Tq=300, Tk=300, Hq=5)
    assert allowed_pairs(masks.causal(), spec) == 3 * 5 * 300 * 301 // 2
    assert allowed_pairs(None, spec) == 3 * 5 * 300 * 300


def test_window_and_documents_pairs() -> None:
    spec = catalog.InputSpec(B=2, Tq=1000, Tk=1000, Hq=2)
    window = 256 * 257 // 2 - 256 + 256 * (1000 - 255)  # ramp of rows 0..254, then 256 each
    assert allowed_pairs(masks.sliding_window(255), spec) == 2 * 2 * window
    mask = catalog.get("documents").build(spec)["mask"]
    dense = mask.dense(1000, 1000)  # [B, 1, T, T]: per-batch documents
    assert allowed_pairs(mask, spec) == int(dense.sum()) * 2


def test_flops_are_density_adjusted() -> None:
    spec = catalog.InputSpec(B=1, Tq=64, Tk=64, Hq=2, D=16)
    pairs = 2 * 64 * 65 // 2
    assert attention_flops(masks.causal(), spec, backward=False) == 4 * 16 * pairs
    assert attention_flops(masks.causal(), spec, backward=True) == 3.5 * 4 * 16 * pairs


def test_baseline_uses_sdpa_as_a_user_would() -> None:
    T = 40
    assert baseline_attn_mask({}, T, T, torch.float32) is None
    assert baseline_label({"mask": masks.causal()}, T, T) == "sdpa(is_causal)"
    assert baseline_attn_mask({"mask": masks.causal()}, T, T, torch.float32) is None
    window = masks.sliding_window(7)
    assert torch.equal(
        baseline_attn_mask({"mask": window}, T, T, torch.float32), window.dense(T, T)
    )
    kwargs = catalog.get("alibi").build(catalog.InputSpec(Tq=T, Tk=T, Hq=4))
    float_mask = baseline_attn_mask(kwargs, T, T, torch.float32)
    assert float_mask.shape == (1, 4, T, T)
    assert torch.isneginf(float_mask[0, 0].triu(1)[0, 1:]).all()
    assert float_mask[0, 0, 5, 3] == -kwargs["bias"].slopes[0] * 2


def _tiny(**overrides):
    options = {"mechanisms": ("causal",), "lengths": (64,), "Hq": 2, "D": 16} | overrides
    return quick_config(**options)


def test_cell_records_contain_baseline_auto_and_ratios() -> None:
    records = run_cell(catalog.get("causal"), 64, "float32", _tiny())
    by_backend = {r.backend: r for r in records}
    baseline = by_backend["baseline"]
    assert baseline.role == "baseline" and baseline.ratio == 1.0
    assert baseline.runs_on == "sdpa(is_causal)"
    assert by_backend["auto"].runs_on.split(":")[0] in backends.BACKENDS
    assert 0 < by_backend["auto"].dispatch_ms < by_backend["auto"].median_ms
    assert set(backends.BACKENDS) <= set(by_backend)
    for r in records:
        if r.status == "skipped":
            assert r.reason
            continue
        assert r.status == "ok", r.reason
        assert r.median_ms > 0 and r.gflops > 0 and len(r.times_ms) >= 1
        if r.role != "baseline":
            assert r.verified is True, r.check
            assert r.ratio == pytest.approx(baseline.median_ms / r.median_ms)


def test_non_softmax_baseline_is_labelled_a_stand_in() -> None:
    records = run_cell(catalog.get("sigmoid"), 64, "float32", _tiny())
    baseline = next(r for r in records if r.role == "baseline")
    assert "stand-in" in baseline.reason and baseline.verified is None
    sdpa = next(r for r in records if r.backend == "sdpa")
    assert sdpa.status == "skipped" and "softmax" in sdpa.reason


def test_wrong_backend_gets_no_ratio() -> None:
    def wrong(call):
        return torch.zeros(call.B, call.Tq, call.Hq, call.Dv, dtype=call.dtype), None

    backends.register_backend(Backend("wrong", "returns zeros", lambda call: None, wrong))
    try:
        records = run_cell(catalog.get("causal"), 64, "float32", _tiny())
    finally:
        del backends.BACKENDS["wrong"]
    row = next(r for r in records if r.backend == "wrong")
    assert row.status == "ok" and row.median_ms is not None
    assert row.verified is False and row.ratio is None
    assert "FAILED" in row.check


def test_large_dense_reference_is_skipped_with_reason() -> None:
    config = _tiny(skip_above={"reference": 32})
    records = run_cell(catalog.get("causal"), 64, "float32", config)
    row = next(r for r in records if r.backend == "reference")
    assert row.status == "skipped" and "O(T^2)" in row.reason


def test_report_files_and_targets(tmp_path) -> None:
    config = _tiny(mechanisms=("softmax", "sliding_window"))
    records = run_cell(catalog.get("softmax"), 64, "float32", config)
    records += run_cell(catalog.get("sliding_window"), 64, "float32", config)
    results = SpeedResults({"B": 1, "Hq": 2, "Hkv": 2, "D": 16, "torch": "t", "threads": 2,
                            "cpu": "c", "date": "d", "baseline": "b", "flops": "f",
                            "memory": "m", "timing": "t", "repeats": 1}, records)  # fmt: skip
    paths = write_report(results, tmp_path / "out")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    data = json.loads(paths["json"].read_text())
    assert SpeedResults.from_json(data).records == records
    assert len(data["targets"]) == 4
    names = [t.name for t in targets(results)]
    assert any("dense fp32" in n for n in names)
    assert "![time vs T](bench.png)" in paths["report"].read_text()


def test_peak_memory_sees_a_large_allocation() -> None:
    mb, seconds = peak_rss_increase_mb(lambda: torch.ones(32 * 2**20 // 4))
    assert mb is not None and mb > 24
    assert seconds > 0


def test_far_behind_backends_are_timed_once_then_dropped() -> None:
    from attnkit.backends.reference import reference_forward

    def slow(call):
        time.sleep(0.05)
        return reference_forward(call)

    backends.register_backend(Backend("slow", "sleeps", lambda call: None, slow))
    config = _tiny(
        lengths=(32, 48, 64), repeats=3, max_repeats=3, slow_call_s=0.02, drop_slower_than=5.0
    )
    try:
        results = run_speed_bench(config)
    finally:
        del backends.BACKENDS["slow"]
    for T in (32, 48):
        cell = {r.backend: r for r in results.cell("causal", T, "float32")}
        assert len(cell["slow"].times_ms) == 1 and cell["slow"].verified
        assert len(cell["baseline"].times_ms) == 3
    last = {r.backend: r for r in results.cell("causal", 64, "float32")}
    assert last["slow"].status == "skipped" and "not timed at larger T" in last["slow"].reason
    assert last["baseline"].status == "ok"


def test_backward_mode_checks_gradients_and_skips_forward_only_backends() -> None:
    config = _tiny(backward=True)
    records = run_cell(catalog.get("causal"), 64, "float32", config)
    spec = catalog.InputSpec(B=1, Tq=64, Tk=64, Hq=2, D=16)
    flops = attention_flops(masks.causal(), spec, backward=True)
    for r in records:
        if r.status == "skipped":
            assert r.reason
            continue
        assert r.status == "ok", r.reason
        assert r.gflops == pytest.approx(flops / r.median_ms / 1e6)
        if r.role != "baseline":
            assert r.verified, r.check
    assert any(r.role == "auto" and r.status == "ok" for r in records)


def test_targets_from_synthetic_records() -> None:
    def row(backend, role, ms, **extra):
        fields = {"median_ms": ms, "times_ms": [ms], "verified": True} | extra
        return Record("sliding_window", 8192, "float32", backend, role, "ok", **fields)

    records = [
        row("baseline", "baseline", 500.0, ratio=1.0),
        row("flex", "backend", 25.0, ratio=20.0),
        row("chunked", "backend", 50.0, ratio=10.0),
        row("auto", "auto", 30.0, ratio=500 / 30, runs_on="flex: cheapest", mask_ms=1.2),
    ]
    records[-1].dispatch_ms = 0.5
    dense, window, auto_vs_best, mask = targets(SpeedResults({}, records))
    assert dense.passed is None  # no dense cell in this grid
    assert window.passed is True and window.value == "20.00×" and window.detail == "flex"
    # auto runs flex, the best backend: its cost is its decision, 0.5 ms of 25 ms
    assert auto_vs_best.passed is True and auto_vs_best.value == "1.02"
    assert mask.passed is True and mask.value == "4.0%"
    records[-1].runs_on = "chunked: cheapest"
    auto_vs_best = targets(SpeedResults({}, records))[2]
    assert auto_vs_best.passed is False and auto_vs_best.value == "2.02"


def test_paired_ratio_uses_rounds_and_falls_back_to_medians() -> None:
    # a disturbed round slows both: per-round ratios stay 1.1, medians would say 1.2
    assert paired_ratio([11.0, 11.0, 33.0], [10.0, 10.0, 30.0]) == pytest.approx(1.1)
    assert paired_ratio([12.0], [10.0, 10.0, 30.0]) == pytest.approx(1.2)
