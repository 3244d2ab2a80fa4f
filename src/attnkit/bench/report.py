"""Showing speed results: a terminal table, the speed targets, JSON, a PNG plot and a
Markdown report that states the machine, the method and each backend's verification."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from attnkit.bench.measure import paired_ratio
from attnkit.bench.speed import Record, SpeedResults

JSON_NAME, PLOT_NAME, REPORT_NAME = "bench.json", "bench.png", "report.md"

COLUMNS = (
    "mechanism",
    "T",
    "dtype",
    "backend",
    "ms",
    "ratio",
    "GFLOP/s",
    "peak MB",
    "1st call s",
    "mask ms",
    "note",
)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def backend_label(r: Record) -> str:
    """``auto→chunked`` for auto rows, the backend name otherwise."""
    if r.role == "auto" and r.runs_on:
        return f"auto→{r.runs_on.split(':', 1)[0]}"
    return r.backend


def _note(r: Record) -> str:
    if r.role == "baseline":
        return (r.runs_on or "") + (" softmax stand-in" if r.reason else "")
    if r.verified is False:
        return "UNVERIFIED: no ratio"
    if r.verified is None:
        return "not verified at this size: no ratio"
    return ""


def table_rows(results: SpeedResults) -> list[list[str]]:
    """One row of ``COLUMNS`` per candidate that ran."""
    rows = []
    for r in results.records:
        if not r.ran:
            continue
        rows.append(
            [
                r.mechanism,
                str(r.T),
                r.dtype,
                backend_label(r),
                _fmt(r.median_ms, ".2f"),
                _fmt(r.ratio, ".2f"),
                _fmt(r.gflops, ".1f"),
                _fmt(r.peak_mb, ".1f"),
                _fmt(r.first_call_s, ".2f"),
                _fmt(r.mask_ms, ".2f"),
                _note(r),
            ]
        )
    return rows


def not_run(results: SpeedResults) -> list[tuple[str, str, int]]:
    """``(backend, reason, cells)`` for skipped and failed candidates, most frequent first."""
    counts = Counter((r.backend, f"{r.status}: {r.reason}") for r in results.records if not r.ran)
    return [(backend, reason, n) for (backend, reason), n in counts.most_common()]


def checks(results: SpeedResults) -> list[list[str]]:
    """One row per checked (mechanism, dtype, candidate): where it was checked and the result."""
    seen: dict[tuple[str, str, str], list[str]] = {}
    for r in results.records:
        key = (r.mechanism, r.dtype, backend_label(r))
        if r.check is not None and key not in seen:
            seen[key] = [*key, str(r.verified_at_T), r.check]
    return list(seen.values())


def rich_table(results: SpeedResults) -> Table:
    table = Table(title="attnkit speed (ratio = baseline ms / ms, > 1 is faster)")
    for column in COLUMNS:
        numeric = column not in ("mechanism", "dtype", "backend", "note")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    rows = table_rows(results)
    for i, row in enumerate(rows):
        last_of_cell = i + 1 == len(rows) or rows[i + 1][:3] != row[:3]
        table.add_row(*row, end_section=last_of_cell)
    return table


# -- targets -------------------------------------------------------------------------------


@dataclass
class Target:
    """One speed goal of the package, evaluated on the results (``passed`` None: not measurable
    in this grid)."""

    name: str
    goal: str
    value: str
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


def _ran(results: SpeedResults, **where: object) -> list[Record]:
    return [
        r for r in results.records if r.ran and all(getattr(r, k) == v for k, v in where.items())
    ]


def _cells(results: SpeedResults) -> list[tuple[str, int, str]]:
    return sorted({(r.mechanism, r.T, r.dtype) for r in results.records})


def _best_backend(rows: list[Record]) -> Record | None:
    verified = [r for r in rows if r.role == "backend" and r.verified]
    return min(verified, key=lambda r: r.median_ms) if verified else None


#: The targets hold from T = 1k; at toy sizes per-call overhead dominates and a verdict would
#: mean nothing. The window and mask-building targets are read at the run's longest T.
TARGET_MIN_T = 1024


def _longest(results: SpeedResults) -> int:
    return max((r.T for r in results.records), default=0)


def _auto_vs_sdpa_dense(results: SpeedResults) -> Target:
    name, goal = "auto vs SDPA, dense fp32", "≥ 0.95×"
    rows = [
        r
        for r in _ran(results, mechanism="softmax", dtype="float32", role="auto")
        if r.ratio is not None and r.T >= TARGET_MIN_T
    ]
    if not rows:
        return Target(
            name, goal, "—", None, f"no verified dense fp32 auto row at T ≥ {TARGET_MIN_T}"
        )
    worst = min(rows, key=lambda r: r.ratio)
    detail = ", ".join(f"T={r.T}: {r.ratio:.2f}" for r in rows)
    return Target(name, goal, f"{worst.ratio:.2f}×", worst.ratio >= 0.95, f"worst over T; {detail}")


def _window_speedup(results: SpeedResults) -> Target:
    target_T = _longest(results)
    name, goal = f"sliding window 256, T={target_T} fp32: best backend vs SDPA + dense mask", "≥ 5×"
    rows = _ran(results, mechanism="sliding_window", dtype="float32", T=target_T, role="backend")
    best = max((r for r in rows if r.ratio is not None), key=lambda r: r.ratio, default=None)
    if best is None:
        return Target(name, goal, "—", None, f"no verified sliding_window fp32 row at T={target_T}")
    return Target(name, goal, f"{best.ratio:.2f}×", best.ratio >= 5, f"{best.backend}")


def _auto_vs_best(results: SpeedResults) -> Target:
    """Auto's time over the best backend's, as two measured parts: the cost of its choice
    (its backend's time over the best's, paired per round) and its decision overhead
    (``dispatch_ms`` over the best's time). Timing auto a second time, next to the backend
    it runs, would compare two noisy measurements of the same work."""
    name, goal = "auto time / best backend time, worst cell", "≤ 1.10"
    worst: tuple[float, str] | None = None
    for mechanism, T, dtype in _cells(results):
        rows = _ran(results, mechanism=mechanism, T=T, dtype=dtype)
        best = _best_backend(rows)
        auto = next((r for r in rows if r.role == "auto"), None)
        if best is None or auto is None or T < TARGET_MIN_T:
            continue
        chosen_name = backend_label(auto).removeprefix("auto→")
        chosen = next((r for r in rows if r.role == "backend" and r.backend == chosen_name), None)
        if chosen is None:
            continue
        choice = paired_ratio(chosen.times_ms, best.times_ms)
        overhead = (auto.dispatch_ms or 0.0) / best.median_ms
        slowdown = choice + overhead
        if worst is None or slowdown > worst[0]:
            where = (
                f"{mechanism} T={T} {dtype}: picks {chosen_name}, {choice:.2f}× the best "
                f"({best.backend}) paired per round, + decision {overhead:.1%}"
            )
            worst = (slowdown, where)
    if worst is None:
        return Target(
            name, goal, "—", None, f"no cell at T ≥ {TARGET_MIN_T} with auto and a backend"
        )
    return Target(name, goal, f"{worst[0]:.2f}", worst[0] <= 1.10, worst[1])


def _mask_building(results: SpeedResults) -> Target:
    target_T = _longest(results)
    name, goal = f"mask building / one attention call (auto's backend), T={target_T} fp32", "< 5%"
    fractions = [
        (r.mask_ms / r.median_ms, r)
        for r in _ran(results, T=target_T, dtype="float32", role="auto")
        if r.mask_ms is not None
    ]
    if not fractions:
        return Target(name, goal, "—", None, f"no masked fp32 auto row at T={target_T}")
    worst, row = max(fractions, key=lambda x: x[0])
    detail = ", ".join(f"{r.mechanism}: {f:.1%}" for f, r in fractions)
    return Target(
        name,
        goal,
        f"{worst:.1%}",
        worst < 0.05,
        f"worst {row.mechanism} on {backend_label(row)}; {detail}",
    )


def targets(results: SpeedResults) -> list[Target]:
    """The speed goals of the package, computed from ``results`` (reported, not asserted:
    timings are noisy and some goals are not met on every machine). A goal whose cells
    are not in the grid is "n/a"."""
    return [
        _auto_vs_sdpa_dense(results),
        _window_speedup(results),
        _auto_vs_best(results),
        _mask_building(results),
    ]


def targets_table(items: list[Target]) -> Table:
    table = Table(title="targets (computed from this run, not asserted)")
    for column in ("target", "goal", "measured", "verdict", "detail"):
        table.add_column(column, overflow="fold")
    styles = {"PASS": "green", "FAIL": "red", "n/a": "yellow"}
    for t in items:
        verdict = f"[{styles[t.verdict]}]{t.verdict}[/]"
        table.add_row(t.name, t.goal, t.value, verdict, t.detail)
    return table


# -- files ---------------------------------------------------------------------------------


def plot(results: SpeedResults, path: Path) -> None:
    """Time vs T (log-log), one subplot per mechanism, a line per backend (colour) and dtype
    (line style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mechanisms = list(dict.fromkeys(r.mechanism for r in results.records))
    dtypes = list(dict.fromkeys(r.dtype for r in results.records))
    labels = sorted(
        {r.backend for r in results.records if r.ran},
        key=lambda b: (b == "baseline", b == "auto", b),
    )
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(labels)}
    colors["baseline"] = "black"
    styles = ["-", "--", ":", "-."]
    ncols = min(4, max(1, len(mechanisms)))
    nrows = -(-len(mechanisms) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.3 * nrows), squeeze=False)
    for ax, mechanism in zip(axes.flat, mechanisms, strict=False):
        for backend in labels:
            for d, dtype in enumerate(dtypes):
                rows = sorted(
                    _ran(results, mechanism=mechanism, backend=backend, dtype=dtype),
                    key=lambda r: r.T,
                )
                if rows:
                    ax.plot(
                        [r.T for r in rows],
                        [r.median_ms for r in rows],
                        marker="o",
                        markersize=3,
                        color=colors[backend],
                        linewidth=2.2 if backend in ("auto", "baseline") else 1.2,
                        linestyle=styles[d % len(styles)],
                        label=f"{backend} {dtype}",
                    )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(mechanism)
        ax.set_xlabel("T")
        ax.set_ylabel("ms" + (" (fwd+bwd)" if results.config.get("backward") else " (fwd)"))
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(mechanisms) :]:
        ax.axis("off")
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 * (1 + len(names) // 6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *map(line, rows)]


def markdown(results: SpeedResults, items: list[Target]) -> str:
    c = results.config
    mode = "forward + backward" if c.get("backward") else "forward"
    lines = [
        "# attnkit speed benchmark",
        "",
        f"{mode}, B={c['B']}, Hq={c['Hq']}, Hkv={c['Hkv']}, D={c['D']}, "
        f"torch {c['torch']}, {c['threads']} threads, {c['cpu']}, {c['date']}.",
        "",
        f"- ratio = baseline ms / ms (> 1 is faster). Baseline: {c['baseline']}.",
        "- A ratio is shown only for rows whose output"
        + (" and gradients" if c.get("backward") else "")
        + " passed attnkit.testing's check against the float64 reference (2× rule) on the "
        "same inputs, at the smallest length of the grid.",
        f"- GFLOP/s: {c['flops']}.",
        f"- peak MB: {c['memory']}.",
        "- 1st call s: first call minus the median (compilation for compiled backends, cache "
        "fills otherwise). mask ms: building the backend's mask structure from a fresh mask.",
        f"- timing: {c['timing']}; at least {c['repeats']} rounds.",
        "",
        "## Targets",
        "",
        *_markdown_table(
            ["target", "goal", "measured", "verdict", "detail"],
            [[t.name, t.goal, t.value, t.verdict, t.detail] for t in items],
        ),
        "",
        f"![time vs T]({PLOT_NAME})",
        "",
        "## Results",
        "",
        *_markdown_table(list(COLUMNS), table_rows(results)),
        "",
        "## Correctness checks",
        "",
        *_markdown_table(
            ["mechanism", "dtype", "backend", "checked at T", "result"], checks(results)
        ),
        "",
        "## Not run",
        "",
        *_markdown_table(
            ["backend", "why", "cells"], [[b, why, str(n)] for b, why, n in not_run(results)]
        ),
        "",
    ]
    return "\n".join(lines)


def write_report(results: SpeedResults, out_dir: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.png`` and ``report.md`` into ``out_dir``; returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = targets(results)
    paths = {"json": out / JSON_NAME, "plot": out / PLOT_NAME, "report": out / REPORT_NAME}
    data = results.to_json() | {"targets": [asdict(t) | {"verdict": t.verdict} for t in items]}
    paths["json"].write_text(json.dumps(data, indent=1))
    plot(results, paths["plot"])
    paths["report"].write_text(markdown(results, items))
    return paths
