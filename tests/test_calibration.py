"""The calibration: what it measures, where it caches it, and when auto uses it."""

from __future__ import annotations

import json
import math

import pytest
import torch

import attnkit
from attnkit import calibration, masks
from attnkit.backends import chunked
from attnkit.costs import MEASURED_ENTRIES, CostTable
from attnkit.machine import capabilities

TINY = calibration.Shape(B=1, T=256, H=2, D=16)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """Calibration at a tiny shape with one round, cached in a temporary folder."""
    monkeypatch.setattr(calibration, "SHAPE", TINY)
    monkeypatch.setattr(calibration, "ROUNDS", 1)
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNKIT_CALIBRATION", "on")
    calibration.forget()
    yield tmp_path
    calibration.forget()


def test_it_measures_every_entry_per_dtype_and_grad_mode(tiny) -> None:
    table = calibration.measure("cpu")
    assert table.source.startswith("measured") and table.capabilities == capabilities("cpu")
    measured = {(name, dtype, grad) for name, dtype, grad, _ in table.rows()}
    native_bf16 = capabilities("cpu").native_bfloat16
    for dtype in ("float32", "bfloat16"):
        for grad in (False, True):
            for name in ("sdpa.causal_edge", "sdpa.mask", "sdpa.bias", "chunked.per_live",
                         "chunked.dense", "chunked.score", "chunked.bias",
                         "chunked.overhead_pairs"):  # fmt: skip
                assert (name, dtype, grad) in measured
            kernel_here = dtype == "float32" or native_bf16
            for name in ("blocksparse.per_live", "blocksparse.score.sigmoid",
                         "blocksparse.score.softplus_l1", "blocksparse.bias"):  # fmt: skip
                assert ((name, dtype, grad) in measured) == kernel_here
            # a partial tile's extra pass is an algorithmic ratio (FACTORS), not measured
            assert ("blocksparse.partial", dtype, grad) not in measured
        # FlexAttention has no backward on the CPU: forward only
        for name in ("flex.per_live", "flex.score", "flex.bias", "flex.overhead_pairs"):
            assert (name, dtype, False) in measured
            assert (name, dtype, True) not in measured
    assert {name for name, *_ in measured} <= set(MEASURED_ENTRIES)
    for name, *_, value in table.rows():
        assert math.isfinite(value) and value >= 0
        if not name.endswith("overhead_pairs"):  # ratios to dense SDPA
            assert value < 1e3


def test_the_table_is_cached_per_machine_and_reused(tiny) -> None:
    first = calibration.calibrate("cpu")
    path = calibration.cache_path(torch.device("cpu"))
    assert path.parent == tiny and path.exists()
    saved = json.loads(path.read_text())
    assert saved["device"] == capabilities("cpu").describe()
    assert saved["source"] == first.source
    again = calibration.calibrate("cpu")  # from the cache: same source, same entries
    assert again.source == first.source and again.rows() == first.rows()
    path.write_text("not json")
    remeasured = calibration.calibrate("cpu")
    assert json.loads(path.read_text())["source"] == remeasured.source


def test_the_cache_key_changes_with_what_the_table_depends_on(tiny, monkeypatch) -> None:
    cpu = torch.device("cpu")
    base = calibration.cache_path(cpu)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert calibration.cache_path(cpu) != base
    monkeypatch.undo()
    monkeypatch.setattr(calibration, "SHAPE", calibration.Shape(T=512))
    assert calibration.cache_path(cpu) != base


def test_auto_measures_on_first_use_and_off_means_conservative(tiny, monkeypatch) -> None:
    x = torch.randn(1, 64, 2, 16)
    with torch.no_grad():  # the gradient entries are measured with gradients all the same
        attnkit.attention(x, x, x, mask=masks.causal())
    table = calibration.table_for("cpu")
    assert table.source.startswith("measured")
    assert table.measured("flex.per_live", torch.float32, False)
    assert table.measured("chunked.per_live", torch.float32, True)
    assert calibration.cache_path(torch.device("cpu")).exists()
    monkeypatch.setenv("ATTNKIT_CALIBRATION", "off")
    assert calibration.table_for("cpu").conservative
    given = CostTable(capabilities("cpu"), "given")
    with calibration.using(given):
        assert calibration.table_for("cpu") is given


def test_the_calibration_length_covers_the_longest_chunked_piece() -> None:
    """Chunked's cost per pair depends on its piece length up to ``MAX_KEYS``: calibrating at a
    shorter length would measure shorter pieces than long calls run, and rank them too cheap."""
    assert calibration.SHAPE.T >= chunked.MAX_KEYS
