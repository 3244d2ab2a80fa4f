from __future__ import annotations

import json

import pytest

from attnkit import masks
from attnkit.backends import native
from attnkit.bench.sparse import (
    SparseCell,
    SparseConfig,
    run_sparse_bench,
    sparse_targets,
    write_sparse,
)
from attnkit.bench.speed import allowed_pairs
from attnkit.catalog import InputSpec


def test_tiny_grid_times_every_candidate_and_writes_files(tmp_path) -> None:
    config = SparseConfig(
        patterns=("causal", "window_256"), lengths=(512,), dtypes=("float32",), repeats=1
    )
    cells = run_sparse_bench(config)
    assert [c.pattern for c in cells] == ["causal", "window_256"]
    causal, window = cells
    assert {"sdpa_dense", "blocksparse", "flex", "sdpa_causal"} <= set(causal.times_ms)
    kernel = native.load("blocksparse_cpu") is not None
    assert ("kernel_gemms" in causal.times_ms) == kernel
    assert ("kernel_gemms" in causal.skipped) != kernel
    assert "sdpa_mask" in window.times_ms
    assert 0 < window.live_fraction <= causal.live_fraction <= 1  # equal at T=512
    # the floor counts kept pairs, not live tiles: the window keeps at most 256 keys per row
    window_pairs = sum(min(i + 1, 256) for i in range(512))
    assert window.floor_ms / causal.floor_ms == pytest.approx(window_pairs / (512 * 513 / 2))
    assert causal.matmul_gflops > 0
    assert all(ms > causal.floor_ms for ms in causal.times_ms.values())
    paths = write_sparse(cells, config, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert len(data["cells"]) == 2 and len(data["targets"]) == 4
    assert paths["plot"].stat().st_size > 0


def test_derived_numbers_and_targets() -> None:
    cell = SparseCell(
        "window_256", 8192, "float32", 0.1, {"sdpa_dense": 100.0, "blocksparse": 12.5, "flex": 25.0}
    )
    assert cell.upper_bound == pytest.approx(10.0)
    assert cell.speedup("sdpa_dense") == pytest.approx(8.0)
    assert cell.efficiency == pytest.approx(0.8)
    vs_flex, efficiency, causal, half = sparse_targets([cell])
    assert vs_flex.value == pytest.approx(2.0) and vs_flex.passed
    assert efficiency.value == pytest.approx(0.8) and efficiency.passed
    assert causal.passed is None and half.passed is None


def test_ceilings_explain_goals_out_of_the_machines_reach() -> None:
    times = {"sdpa_dense": 100.0, "blocksparse": 12.5, "flex": 16.0}
    reachable = SparseCell("blocks_512", 8192, "float32", 0.1, dict(times), floor_ms=8.0)
    beyond = SparseCell(
        "documents", 8192, "float32", 0.1, times | {"blocksparse": 12.8}, floor_ms=12.0
    )
    assert reachable.ceiling("flex") == pytest.approx(2.0)
    vs_flex = sparse_targets([reachable, beyond])[0]
    assert not vs_flex.passed and vs_flex.value == pytest.approx(1.25)
    assert "ceiling 1.33×" in vs_flex.detail
    assert "1 of 2 failing cells have a ceiling < 1.5×" in vs_flex.detail
    assert "GEMMs alone" not in vs_flex.detail  # no cell measured them


def test_the_kernels_own_gemms_bound_what_its_tiles_can_reach() -> None:
    times = {"sdpa_dense": 100.0, "blocksparse": 12.5, "flex": 16.0, "kernel_gemms": 11.0}
    cell = SparseCell("blocks_512", 8192, "float32", 0.1, times, floor_ms=8.0)
    assert cell.reachable("flex") == pytest.approx(16.0 / 11.0)
    vs_flex = sparse_targets([cell])[0]
    assert "reachable 1.45×" in vs_flex.detail and "ceiling 2.00×" in vs_flex.detail
    assert "in 1 of 1 the kernel's GEMMs alone are slower than the goal" in vs_flex.detail


def test_the_floor_counts_kept_pairs_exactly() -> None:
    T = 1100  # several tiles, the last one short

    def kept_pairs(mask, T: int, batch: int, heads: int) -> int:
        return allowed_pairs(mask, InputSpec(batch, T, T, heads))

    assert kept_pairs(None, T, 2, 3) == 2 * 3 * T * T
    assert kept_pairs(masks.causal(), T, 1, 2) == 2 * T * (T + 1) // 2
    window = masks.sliding_window(9)  # each query keeps itself and up to 9 earlier keys
    assert kept_pairs(window, T, 1, 1) == sum(min(i + 1, 10) for i in range(T))
    per_head = masks.from_dense(masks.causal().dense(T, T).expand(1, 2, T, T).clone())
    assert kept_pairs(per_head, T, 1, 4) == 4 * T * (T + 1) // 2


def test_unknown_patterns_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown pattern 'nope'"):
        SparseConfig(patterns=("nope",))
