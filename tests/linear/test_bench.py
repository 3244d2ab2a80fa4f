"""The linear benchmark's machinery on a tiny grid (no timing assertions)."""

from __future__ import annotations

import math

import pytest

from attnkit.backends import native
from attnkit.bench.linear import (
    LinearBenchConfig,
    LinearRecord,
    crossing_point,
    loglog_slope,
    plot_linear,
    quick_linear_config,
    run_linear_bench,
    summarize,
    write_linear,
)


def test_slope_and_crossing_point() -> None:
    assert loglog_slope([(1024, 1.0), (2048, 4.0), (4096, 16.0)]) == pytest.approx(2.0)
    # Ratio 0.5 at 1k, 2 at 4k: crosses 1 halfway on log axes, at 2k; never back below 1.
    assert crossing_point([(1024, 0.5), (4096, 2.0), (8192, 3.0)]) == pytest.approx(2048)
    assert crossing_point([(1024, 2.0), (2048, 0.9)]) is None
    assert crossing_point([(1024, 1.5)]) == 1024


def test_tiny_run_records_checks_and_plot(tmp_path) -> None:
    config = quick_linear_config(
        mechanisms=("retention",), lengths=(64, 128), peers=False, verify_T=32, decode_steps=2
    )
    results = run_linear_bench(config)
    prefill = [r for r in results.records if r.phase == "prefill"]
    decode = [r for r in results.records if r.phase == "decode"]
    # the recurrent form is timed for prefill where it runs on the compiled kernel
    roles = ("ours", "baseline", "recurrent") if native.load("linear_cpu") else ("ours", "baseline")
    assert {(r.T, r.role) for r in prefill} == {(T, role) for T in (64, 128) for role in roles}
    ours = [r for r in prefill if r.role in ("ours", "recurrent")]
    assert all(r.verified and r.check.startswith("passed") for r in ours)
    assert all(r.median_ms > 0 and r.ratio > 0 for r in ours)
    assert {r.candidate for r in decode} == {"recurrent", "sdpa over KV cache"}
    (row,) = results.summary
    assert row["mechanism"] == "retention" and math.isfinite(row["slope_ours"])
    assert row["peer_compared_form"] is None  # no T=8192 cell in this run
    assert plot_linear(results, tmp_path / "linear.png").stat().st_size > 0
    data, _ = write_linear(results, tmp_path / "out")
    assert '"summary"' in data.read_text()


def test_the_peer_is_compared_with_the_faster_of_our_forms() -> None:
    def cell(candidate: str, role: str, ms: float, T: int = 8192) -> LinearRecord:
        record = LinearRecord("prefill", "lightning_attention", T, "float32", candidate, role)
        record.median_ms, record.ratio = ms, 100.0 / ms
        return record

    records = [
        cell("chunked", "ours", 8.0), cell("recurrent", "recurrent", 4.0),
        cell("sdpa causal", "baseline", 100.0), cell("fla", "peer", 20.0),
        cell("chunked", "ours", 40.0, 32768), cell("recurrent", "recurrent", 20.0, 32768),
        cell("sdpa causal", "baseline", 1600.0, 32768),
    ]  # fmt: skip
    (row,) = summarize(records)
    assert row["peer_compared_form"] == "recurrent"
    assert row["speedup_vs_peer_at_8k"] == pytest.approx(5.0)
    assert row["ratio_at_32k"] == pytest.approx(2.5)  # the chunked form's ratio
    assert row["recurrent_ratio_at_32k"] == pytest.approx(5.0)
    # a peer computing part of the mechanism (BASED's Taylor half) meets our rows for that part
    matching = [cell("half, chunked", "matching", 10.0), cell("half, recurrent", "matching", 5.0)]
    (row,) = summarize(records + matching)
    assert row["peer_compared_form"] == "half, recurrent"
    assert row["speedup_vs_peer_at_8k"] == pytest.approx(4.0)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="not a causal mechanism with a chunked form"):
        LinearBenchConfig(mechanisms=("agent_attention",))
    with pytest.raises(ValueError, match="unknown dtype"):
        LinearBenchConfig(dtypes=("float8",))
    with pytest.raises(ValueError, match="need Hkv dividing them"):
        LinearBenchConfig(H=4, Hkv=3)
    with pytest.raises(ValueError, match="flare_causal need one key head per query head"):
        LinearBenchConfig(H=4, Hkv=2)


def test_gqa_inputs_run_the_recurrent_kernel_and_skip_mha_peers() -> None:
    config = quick_linear_config(
        mechanisms=("gla",), lengths=(64,), H=4, Hkv=2, verify_T=32, decode_steps=2
    )
    results = run_linear_bench(config)
    prefill = {r.candidate: r for r in results.records if r.phase == "prefill"}
    assert prefill["chunked"].verified and prefill["sdpa causal"].median_ms > 0
    assert ("recurrent" in prefill) == (native.load("linear_cpu") is not None)
    assert all(r.verified for r in prefill.values() if r.role in ("ours", "recurrent"))
    (peer,) = [r for r in results.records if r.role == "peer"]
    assert peer.status == "skipped" and "as many key/value heads as query heads" in peer.reason
    decode = [r for r in results.records if r.phase == "decode"]
    assert all(r.median_ms > 0 for r in decode)
