"""The ``attnkit`` command line: list, bench, explain."""

from __future__ import annotations

import contextlib
import json
from statistics import median

import pytest
import torch
from typer.testing import CliRunner

import attnkit
from attnkit import backends, calibration, catalog, machine
from attnkit.backends import BACKENDS
from attnkit.bench import SpeedConfig
from attnkit.cli import app
from attnkit.costs import CostTable

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


#: auto's costs for the bench test: chunked at 1/100 of SDPA per tile and no fixed cost, every
#: other backend far behind, so auto picks chunked in every cell whatever the machine.
CHUNKED_FIRST = CostTable(
    machine.capabilities("cpu"),
    "synthetic",
    {
        ("chunked.per_live", "*", None): 0.01,
        ("chunked.dense", "*", None): 0.01,
        ("chunked.overhead_pairs", "*", None): 0.0,
        ("blocksparse.per_live", "*", None): 50.0,
        ("flex.per_live", "*", None): 50.0,
    },
)


def test_bench_quick_writes_report(tmp_path) -> None:
    """The report holds every requested cell with every candidate; auto's row names the backend
    the injected costs rank first (and its cell's record of that backend ran); each ratio is
    the baseline's time over the row's, both as recorded; the CPU and cost table are stored."""
    out = tmp_path / "bench"
    requested = ["softmax", "sliding_window", "sigmoid"]
    args = ["bench", "--quick", "--out", str(out), "--mechanisms", ",".join(requested)]
    with calibration.using(CHUNKED_FIRST):
        result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.png", "report.md"}
    data = json.loads((out / "bench.json").read_text())
    config = data["config"]
    assert config["lengths"] == [128, 256] and config["threads"] >= 1
    assert config["cpu"] == machine.cpu_flags_line()
    assert config["cost_table"]["source"] == "synthetic"
    assert config["cost_table"]["entries"] == [list(row) for row in CHUNKED_FIRST.rows()]
    assert "targets" in result.output and "baseline" in result.output

    records = data["records"]
    cells = {(r["mechanism"], r["T"], r["dtype"]) for r in records}
    assert cells == {(m, T, "float32") for m in requested for T in (128, 256)}
    for mechanism, T, dtype in cells:
        rows = [r for r in records if (r["mechanism"], r["T"], r["dtype"]) == (mechanism, T, dtype)]
        where = f"{mechanism} T={T}"
        names = [r["backend"] for r in rows]
        assert sorted(names) == sorted([*BACKENDS, "auto", "baseline"]), where
        by_name = {r["backend"]: r for r in rows}
        baseline, auto = by_name["baseline"], by_name["auto"]
        assert baseline["status"] == "ok" and baseline["ratio"] == 1.0, where

        spec = catalog.InputSpec(B=1, Tq=T, Tk=T, Hq=2, D=32)
        with torch.no_grad(), calibration.using(CHUNKED_FIRST):
            expected = attnkit.explain(*spec.make_inputs(), **catalog.get(mechanism).build(spec))
        assert expected.chosen == "chunked"
        assert auto["status"] == "ok", (where, auto["reason"])
        assert auto["runs_on"] == f"{expected.chosen}: {expected.why}", where
        assert by_name[expected.chosen]["status"] == "ok", where

        for r in rows:
            if r["status"] != "ok":
                assert r["reason"] and r["ratio"] is None, (where, r["backend"])
                continue
            assert r["median_ms"] == pytest.approx(median(r["times_ms"])), (where, r["backend"])
            if r["role"] == "baseline":
                continue
            if not r["verified"]:
                assert r["ratio"] is None, (where, r["backend"])
                continue
            # --quick times one round: the ratio is the quotient of the round's two times
            assert len(r["times_ms"]) == len(baseline["times_ms"]) == 1
            ratio = baseline["times_ms"][0] / r["times_ms"][0]
            assert r["ratio"] == pytest.approx(ratio), (where, r["backend"])
        assert auto["verified"] and auto["ratio"] is not None, where
    report = (out / "report.md").read_text()
    assert all(f"| {m} | 256 | float32 | auto→chunked |" in report for m in requested)


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
