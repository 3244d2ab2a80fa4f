"""The ``attnkit`` command line: list, bench, explain."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from typer.testing import CliRunner

import attnkit
from attnkit import backends, catalog
from attnkit.bench import SpeedConfig
from attnkit.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "250"}


@pytest.fixture(autouse=True)
def uncompiled_flex():
    """Compiling FlexAttention costs seconds per shape; these tests time nothing real."""
    with getattr(backends.flex, "eager", contextlib.nullcontext)():
        yield


def test_list_shows_every_mechanism_with_backends() -> None:
    result = runner.invoke(app, ["list"], env=WIDE)
    assert result.exit_code == 0, result.output
    for name, mechanism in catalog.MECHANISMS.items():
        assert name in result.output
        assert mechanism.paper.split(" — ")[0][:30] in result.output
    assert "reference" in result.output


def test_list_family_filter() -> None:
    result = runner.invoke(app, ["list", "--family", "score"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "sigmoid" in result.output and "sliding_window" not in result.output
    bad = runner.invoke(app, ["list", "--family", "nope"], env=WIDE)
    assert bad.exit_code != 0 and "static sparse" in bad.output


def test_bench_quick_writes_report(tmp_path) -> None:
    out = tmp_path / "bench"
    args = ["bench", "--quick", "--out", str(out), "--mechanisms", "softmax,sliding_window,sigmoid"]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.png", "report.md"}
    data = json.loads((out / "bench.json").read_text())
    assert data["config"]["lengths"] == [128, 256] and data["config"]["threads"] >= 1
    ran = [r for r in data["records"] if r["status"] == "ok"]
    assert {r["mechanism"] for r in ran} == {"softmax", "sliding_window", "sigmoid"}
    assert sum(r["role"] == "baseline" for r in ran) == 6  # one per cell
    assert all(r["ratio"] > 0 for r in ran if r["role"] == "auto")
    assert "targets" in result.output and "baseline" in result.output


def test_bench_rejects_unknown_mechanism(tmp_path) -> None:
    args = ["bench", "--quick", "--out", str(tmp_path), "--mechanisms", "nope"]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code != 0
    assert "sliding_window" in result.output


@pytest.mark.parametrize("grad", [False, True])
def test_explain_prints_the_chosen_backend(grad: bool) -> None:
    args = ["explain", "--mechanism", "sliding_window", "--length", "1024"]
    result = runner.invoke(app, args + (["--grad"] if grad else []), env=WIDE)
    assert result.exit_code == 0, result.output
    grid = SpeedConfig()
    spec = catalog.InputSpec(B=grid.B, Tq=1024, Tk=1024, Hq=grid.Hq, D=grid.D)
    q, k, v = spec.make_inputs(requires_grad=grad)
    with torch.enable_grad() if grad else torch.no_grad():
        expected = attnkit.explain(q, k, v, **catalog.get("sliding_window").build(spec))
    assert f"runs on: {expected.chosen}" in result.output
    for other in expected.rejected:
        assert f"not {other}:" in result.output


def test_explain_unknown_mechanism_lists_names() -> None:
    result = runner.invoke(app, ["explain", "--mechanism", "nope"], env=WIDE)
    assert result.exit_code != 0 and "sliding_window" in result.output


def test_bench_variants_runs_a_tiny_grid(tmp_path) -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "variants", "--lengths", "64", "--mechanisms", "rope,gqa", "--repeats", "1",
         "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "rope" in result.output and (tmp_path / "variants.json").exists()
    bad = CliRunner().invoke(app, ["bench", "variants", "--mechanisms", "causal"], env=WIDE)
    assert bad.exit_code != 0 and "attnkit bench --mechanisms causal" in bad.output


def test_bench_points_layer_mechanisms_to_the_variants_bench(tmp_path) -> None:
    result = CliRunner().invoke(app, ["bench", "--quick", "--mechanisms", "mla"], env=WIDE)
    assert result.exit_code != 0 and "attnkit bench variants --mechanisms mla" in result.output


def test_bench_linear_runs_a_tiny_grid(tmp_path) -> None:
    options = {"--lengths": "128", "--dtypes": "float32", "--mechanisms": "linear_attention"}
    args = ["bench", "linear", *(x for item in options.items() for x in item)]
    args += ["--repeats", "1", "--no-decode", "--out", str(tmp_path)]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "linear.json").exists() and (tmp_path / "linear.png").exists()
    bad = runner.invoke(app, ["bench", "linear", "--mechanisms", "agent_attention"], env=WIDE)
    assert bad.exit_code != 0 and "not a causal mechanism" in bad.output
