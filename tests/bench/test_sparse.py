from __future__ import annotations

import json

import pytest

from attnkit.bench.sparse import (
    SparseCell,
    SparseConfig,
    run_sparse_bench,
    sparse_targets,
    write_sparse,
)


def test_tiny_grid_times_every_candidate_and_writes_files(tmp_path) -> None:
    config = SparseConfig(
        patterns=("causal", "window_256"), lengths=(512,), dtypes=("float32",), repeats=1
    )
    cells = run_sparse_bench(config)
    assert [c.pattern for c in cells] == ["causal", "window_256"]
    causal, window = cells
    assert {"sdpa_dense", "blocksparse", "flex", "sdpa_causal"} <= set(causal.times_ms)
    assert "sdpa_mask" in window.times_ms
    assert 0 < window.live_fraction <= causal.live_fraction <= 1  # equal at T=512
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


def test_unknown_patterns_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown pattern 'nope'"):
        SparseConfig(patterns=("nope",))
