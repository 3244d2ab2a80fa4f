"""The ``attnkit`` command: ``list`` the catalog, ``bench`` the speed grid, ``explain`` a call.

attnkit list [--family "static sparse"]
attnkit bench [--quick] [--lengths 1024,2048] [--dtypes float32] [--backward] [--out DIR]
attnkit bench variants [--lengths 1024,4096] [--mechanisms rope,mla] [--backward] [--compiled]
attnkit bench sparse [--lengths 4096,8192] [--dtypes float32] [--patterns causal,window_256]
attnkit bench linear [--lengths 1024,8192] [--mechanisms gla,retention] [--no-decode] [--kv-heads 1]
attnkit bench kv [--policies snapkv,streaming_llm] [--budgets 0.2,128]
attnkit explain --mechanism sliding_window --length 4096 [--dtype float32] [--grad]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, TypeVar

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import attnkit
from attnkit import calibration, catalog, machine
from attnkit.bench import (
    Record,
    SpeedConfig,
    quick_config,
    rich_table,
    run_speed_bench,
    targets,
    targets_table,
    write_report,
)
from attnkit.bench.kv import POLICY_NAMES, KVBenchConfig, kv_table, run_kv_bench, write_kv
from attnkit.bench.linear import LinearBenchConfig, run_linear_bench, write_linear
from attnkit.bench.report import backend_label
from attnkit.bench.sparse import (
    PATTERNS,
    SparseConfig,
    run_sparse_bench,
    sparse_table,
    sparse_targets,
    write_sparse,
)
from attnkit.bench.speed import DTYPES, ProgressFn
from attnkit.bench.variants import (
    VariantsConfig,
    run_variants_bench,
    variants_table,
    write_variants,
)
from attnkit.costs import MEASURED_ENTRIES, CostTable

T = TypeVar("T")

#: The default speed grid; ``explain`` defaults to its sizes.
_GRID = SpeedConfig()

app = typer.Typer(
    help="attnkit: attention mechanisms behind one API, checked and benchmarked.",
    no_args_is_help=True,
    add_completion=False,
)


def _console() -> Console:
    """Rich console; output that is not a terminal (pipes, logs, tests) gets wide lines
    instead of rich's 80-column default, unless ``COLUMNS`` says otherwise."""
    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return Console()
    return Console(width=200)


def _with_progress(console: Console, run: Callable[[ProgressFn], T], first: str = "starting") -> T:
    """``run(progress)`` under a transient progress bar; ``progress(done, total, label)``."""
    columns = (
        TextColumn("{task.description:<40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(first, total=None)
        return run(
            lambda done, total, label: bar.update(
                task, completed=done, total=total, description=label
            )
        )


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command("list")
def list_mechanisms(
    family: Annotated[
        str | None, typer.Option(help=f"only this family: {', '.join(catalog.FAMILIES)}")
    ] = None,
) -> None:
    """Every mechanism of the catalog: family, paper, and the backends that run it here."""
    if family is not None and family not in catalog.FAMILIES:
        raise typer.BadParameter(
            f"unknown family {family!r}; choose one of: {', '.join(catalog.FAMILIES)}",
            param_hint="--family",
        )
    table = Table(title="attnkit mechanisms (backends probed on this machine)")
    for column in ("name", "family", "paper", "forward", "forward+backward"):
        table.add_column(column, overflow="fold")
    for mechanism in catalog.MECHANISMS.values():
        if family is not None and mechanism.family != family:
            continue
        if mechanism.kind == "attention":
            forward = ", ".join(catalog.backends_for(mechanism, grad=False)) or "none"
            backward = ", ".join(catalog.backends_for(mechanism, grad=True)) or "none"
        else:  # its own code, calling attention with backend="auto" where it attends
            forward = backward = f"own {mechanism.kind}"
        table.add_row(mechanism.name, mechanism.family, mechanism.paper, forward, backward)
    _console().print(table)


def _bench_config(
    quick: bool,
    lengths: str | None,
    dtypes: str | None,
    mechanisms: str | None,
    repeats: int | None,
    backward: bool,
    device: str = "cpu",
) -> SpeedConfig:
    config = quick_config() if quick else SpeedConfig()
    overrides: dict = {"backward": backward, "device": device}
    if lengths is not None:
        overrides["lengths"] = tuple(int(t) for t in _split(lengths) or [])
    if dtypes is not None:
        overrides["dtypes"] = tuple(_split(dtypes) or [])
    if mechanisms is not None:
        overrides["mechanisms"] = tuple(_split(mechanisms) or [])
    if repeats is not None:
        overrides["repeats"] = repeats
        overrides["max_repeats"] = max(repeats, config.max_repeats)
    try:
        return replace(config, **overrides)
    except (KeyError, ValueError) as error:
        raise typer.BadParameter(str(error).strip("'\"")) from None


bench_app = typer.Typer(
    help="Benchmarks. Without a subcommand: the speed grid of the attention backends."
)
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    out: Annotated[str, typer.Option(help="folder for bench.json, bench.png, report.md")] = (
        "bench-out"
    ),
    lengths: Annotated[str | None, typer.Option(help="comma list, e.g. 1024,4096")] = None,
    dtypes: Annotated[str | None, typer.Option(help="comma list: float32,bfloat16")] = None,
    mechanisms: Annotated[
        str | None,
        typer.Option(help="comma list of catalog names; a+b composes (sigmoid+sliding_window)"),
    ] = None,
    repeats: Annotated[int | None, typer.Option(help="minimum timed rounds per cell")] = None,
    backward: Annotated[bool, typer.Option(help="time forward+backward")] = False,
    quick: Annotated[
        bool, typer.Option(help="tiny grid for smoke runs (T=128,256, fp32; ~30 s)")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu, or cuda / cuda:N")] = "cpu",
) -> None:
    """Time every backend, auto and the SDPA baseline on the speed grid; write a report."""
    if ctx.invoked_subcommand is not None:
        return
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device here (torch.cuda.is_available() is False)")
    config = _bench_config(quick, lengths, dtypes, mechanisms, repeats, backward, device)
    console = _console()
    console.print(
        f"[bold]attnkit bench[/] — {'forward+backward' if config.backward else 'forward'}; "
        f"mechanisms {', '.join(config.mechanisms)}; T {', '.join(map(str, config.lengths))}; "
        f"{', '.join(config.dtypes)}; B={config.B} Hq={config.Hq} Hkv={config.Hkv or config.Hq} "
        f"D={config.D}; ≥{config.repeats} timed rounds per cell; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    start = time.perf_counter()
    console.print(f"CPU: {machine.cpu_flags_line()}")
    console.print(calibration_table(calibration.table_for(config.device)))
    if sys.stdout.isatty():
        results = _with_progress(
            console, lambda progress: run_speed_bench(config, progress=progress)
        )
    else:  # logs and pipes: one line per finished cell, as it finishes
        results = run_speed_bench(
            config, cell_done=lambda records: console.print(cell_line(records), markup=False)
        )
    console.print(rich_table(results))
    items = targets(results)
    console.print(targets_table(items))
    paths = write_report(results, out)
    console.print(
        f"wrote {paths['json']}, {paths['plot']}, {paths['report']} "
        f"in {time.perf_counter() - start:.0f} s"
    )


@bench_app.command("variants")
def bench_variants(
    out: Annotated[str, typer.Option(help="folder for variants.json")] = "bench-out",
    lengths: Annotated[str, typer.Option(help="comma list, e.g. 1024,4096")] = "1024,4096",
    dtype: Annotated[str, typer.Option(help=", ".join(DTYPES))] = "float32",
    mechanisms: Annotated[
        str | None, typer.Option(help="comma list (default: every function/layer mechanism)")
    ] = None,
    repeats: Annotated[int, typer.Option(help="timed rounds per cell")] = 5,
    backward: Annotated[bool, typer.Option(help="time forward+backward")] = False,
    compiled: Annotated[
        bool, typer.Option(help="time each under torch.compile(fullgraph=True) against eager")
    ] = False,
) -> None:
    """Time the function and layer mechanisms (RoPE, head layouts, gates, ...) against plain
    causal attention / a plain GQA layer on the same inputs; with --compiled, compiled against
    the same mechanism in eager mode."""
    overrides: dict = {}
    if mechanisms is not None:
        overrides["mechanisms"] = tuple(_split(mechanisms) or [])
    try:
        config = VariantsConfig(
            lengths=tuple(int(t) for t in _split(lengths) or []),
            dtype=dtype,
            repeats=repeats,
            backward=backward,
            compiled=compiled,
            **overrides,
        )
    except (KeyError, ValueError) as error:
        raise typer.BadParameter(str(error).strip("'\"")) from None
    console = _console()
    start = time.perf_counter()
    records = run_variants_bench(config)
    console.print(variants_table(records, compiled))
    path = write_variants(records, config, out)
    console.print(f"wrote {path} in {time.perf_counter() - start:.0f} s")


@bench_app.command("sparse")
def bench_sparse(
    out: Annotated[str, typer.Option(help="folder for sparse.json and sparse.png")] = "bench-out",
    lengths: Annotated[str, typer.Option(help="comma list")] = "4096,8192,16384,32768",
    dtypes: Annotated[str, typer.Option(help="comma list")] = "float32,bfloat16",
    patterns: Annotated[
        str | None, typer.Option(help=f"comma list of: {', '.join(PATTERNS)}")
    ] = None,
    repeats: Annotated[int, typer.Option(help="timed rounds per candidate")] = 3,
) -> None:
    """Block-sparse path vs FlexAttention vs SDPA on masks of every density, T = 4k…32k."""
    overrides: dict = {}
    if patterns is not None:
        overrides["patterns"] = tuple(_split(patterns) or [])
    try:
        config = SparseConfig(
            lengths=tuple(int(t) for t in _split(lengths) or []),
            dtypes=tuple(_split(dtypes) or []),
            repeats=repeats,
            **overrides,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    console = _console()
    start = time.perf_counter()
    cells = _with_progress(console, lambda progress: run_sparse_bench(config, progress))
    console.print(sparse_table(cells))
    table = Table(title="targets (computed from this run, not asserted)")
    for column in ("target", "goal", "measured", "verdict", "detail"):
        table.add_column(column, overflow="fold")
    for t in sparse_targets(cells):
        verdict = "n/a" if t.passed is None else "PASS" if t.passed else "FAIL"
        table.add_row(
            t.name, t.goal, "—" if t.value is None else f"{t.value:.2f}", verdict, t.detail
        )
    console.print(table)
    paths = write_sparse(cells, config, out)
    console.print(f"wrote {paths['json']}, {paths['plot']} in {time.perf_counter() - start:.0f} s")


@bench_app.command("linear")
def bench_linear(
    out: Annotated[str, typer.Option(help="folder for linear.json and linear.png")] = "bench-out",
    lengths: Annotated[str, typer.Option(help="comma list")] = (
        "1024,2048,4096,8192,16384,32768,65536"
    ),
    dtypes: Annotated[str, typer.Option(help="comma list")] = "float32,bfloat16",
    mechanisms: Annotated[str | None, typer.Option(help="comma list of linear mechanisms")] = None,
    sdpa_max_t: Annotated[int, typer.Option(help="longest T for the SDPA baseline")] = 32768,
    repeats: Annotated[int, typer.Option(help="timed rounds per candidate")] = 3,
    decode: Annotated[bool, typer.Option(help="also time decoding per token")] = True,
    kv_heads: Annotated[
        int | None, typer.Option(help="key/value heads for GQA inputs (default: 4, MHA)")
    ] = None,
) -> None:
    """Linear/recurrent chunked forms vs SDPA causal (and flash-linear-attention's reference
    functions when installed): time, memory, crossing point, slopes, decode per token."""
    overrides: dict = {}
    if mechanisms is not None:
        overrides["mechanisms"] = tuple(_split(mechanisms) or [])
    try:
        config = LinearBenchConfig(
            lengths=tuple(int(t) for t in _split(lengths) or []),
            dtypes=tuple(_split(dtypes) or []),
            sdpa_max_T=sdpa_max_t,
            repeats=repeats,
            decode=decode,
            Hkv=kv_heads,
            **overrides,
        )
    except (KeyError, ValueError) as error:
        raise typer.BadParameter(str(error).strip("'\"")) from None
    console = _console()
    start = time.perf_counter()
    results = _with_progress(console, lambda progress: run_linear_bench(config, progress))
    table = Table(title="linear/recurrent vs SDPA causal (ratio = SDPA ms / ms)")
    for column in (
        "phase",
        "mechanism",
        "T",
        "dtype",
        "candidate",
        "ms",
        "peak MB",
        "ratio",
        "note",
    ):
        table.add_column(column, overflow="fold")
    for r in results.records:
        table.add_row(
            r.phase, r.mechanism, str(r.T), r.dtype, r.candidate,
            "—" if r.median_ms is None else f"{r.median_ms:.2f}",
            "—" if r.peak_mb is None else f"{r.peak_mb:.0f}",
            "—" if r.ratio is None else f"{r.ratio:.2f}",
            r.reason or "",
        )  # fmt: skip
    console.print(table)
    summary = Table(title="summary per mechanism (goals: crossing ≤ 2048, ≥ 10× at 32k, slope ≈ 1)")
    columns = ("mechanism", "dtype", "crossing_T", "ratio_at_32k", "recurrent_ratio_at_32k",
               "slope_ours", "slope_sdpa", "speedup_vs_peer_at_8k", "peer_compared_form",
               "decode_slope")  # fmt: skip
    for column in columns:
        summary.add_column(column)
    for row in results.summary:
        summary.add_row(
            *(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns)
        )
    console.print(summary)
    data, plot = write_linear(results, out)
    console.print(f"wrote {data}, {plot} in {time.perf_counter() - start:.0f} s")


@bench_app.command("kv")
def bench_kv(
    out: Annotated[str, typer.Option(help="folder for kv.json and kv.png")] = "bench-out",
    policies: Annotated[
        str | None, typer.Option(help=f"comma list of: {', '.join(POLICY_NAMES)}")
    ] = None,
    budgets: Annotated[
        str, typer.Option(help="comma list: fractions of the prompt (0.2) or token counts (128)")
    ] = "0.1,0.2,0.5,128,256",
) -> None:
    """KV-cache policies on SmolLM2-135M: perplexity, passkey retrieval, bytes kept, decode time."""
    overrides: dict = {}
    if policies is not None:
        overrides["policies"] = tuple(_split(policies) or [])
    try:
        parsed = tuple(float(b) if "." in b else int(b) for b in _split(budgets) or [])
        config = KVBenchConfig(budgets=parsed, **overrides)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    console = _console()
    start = time.perf_counter()
    rows = _with_progress(
        console, lambda progress: run_kv_bench(config, progress), first="loading SmolLM2"
    )
    console.print(kv_table(rows, config))
    paths = write_kv(rows, config, out)
    console.print(f"wrote {paths['json']}, {paths['plot']} in {time.perf_counter() - start:.0f} s")


def cell_line(records: list[Record]) -> str:
    """One finished cell in one line: auto's choice and time, the fastest backend, SDPA."""
    first = records[0]
    timed = [r for r in records if r.ran]
    parts = [f"{first.mechanism} T={first.T} {first.dtype}:"]
    for role in ("auto", "baseline"):
        for r in timed:
            if r.role == role:
                parts.append(f"{backend_label(r)} {r.median_ms:.1f} ms")
    backends = [r for r in timed if r.role == "backend"]
    if backends:
        best = min(backends, key=lambda r: r.median_ms)
        parts.append(f"fastest backend {best.backend} {best.median_ms:.1f} ms")
    return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


def calibration_table(table: CostTable) -> Table:
    """The measured entries of ``table``, one row per entry and dtype, grad modes side by side."""
    grid = Table(title=f"cost table of {table.capabilities.describe()}\n{table.source}")
    for column in ("entry", "dtype", "forward", "forward+backward", "meaning"):
        grid.add_column(column, overflow="fold")
    values = {(name, dtype, grad): value for name, dtype, grad, value in table.rows()}
    for name, meaning in MEASURED_ENTRIES.items():
        for dtype in sorted({d for n, d, _ in values if n == name}):
            cells = [values.get((name, dtype, grad)) for grad in (False, True)]
            grid.add_row(name, dtype, *("-" if c is None else f"{c:.3g}" for c in cells), meaning)
    return grid


@app.command()
def calibrate(
    device: Annotated[str, typer.Option(help="cpu, or cuda / cuda:N")] = "cpu",
    force: Annotated[bool, typer.Option(help="measure again even if a table is cached")] = False,
) -> None:
    """Measure what `auto` needs to rank the backends on this machine (cached per machine,
    device, torch and attnkit version and thread count) and print the table."""
    console = _console()
    if not calibration.enabled():
        console.print("ATTNKIT_CALIBRATION=off: auto uses the conservative table; measuring anyway")
    table = calibration.calibrate(device, force=force)
    console.print(calibration_table(table))
    console.print(f"cached in {calibration.cache_path(torch.device(device))}")


@app.command()
def explain(
    mechanism: Annotated[str, typer.Option(help="a catalog name (see `attnkit list`)")],
    length: Annotated[int, typer.Option(help="sequence length T (queries = keys)")] = 4096,
    dtype: Annotated[str, typer.Option(help=", ".join(DTYPES))] = "float32",
    grad: Annotated[bool, typer.Option(help="the call needs gradients")] = False,
    batch: Annotated[int, typer.Option(help="batch size B")] = _GRID.B,
    heads: Annotated[int, typer.Option(help="query heads (= k/v heads)")] = _GRID.Hq,
    head_dim: Annotated[int, typer.Option(help="head dim D")] = _GRID.D,
) -> None:
    """Which backend `auto` runs for a mechanism at this size, and why not each other one."""
    try:
        chosen = catalog.get(mechanism)
    except KeyError as error:
        raise typer.BadParameter(error.args[0], param_hint="--mechanism") from None
    if dtype not in DTYPES:
        raise typer.BadParameter(f"choose one of: {', '.join(DTYPES)}", param_hint="--dtype")
    spec = catalog.InputSpec(
        B=batch, Tq=length, Tk=length, Hq=heads, D=head_dim, dtype=DTYPES[dtype]
    )
    q, k, v = spec.make_inputs(requires_grad=grad)
    console = _console()
    with torch.enable_grad() if grad else torch.no_grad():
        explanation = attnkit.explain(q, k, v, **chosen.build(spec))
    console.print(
        f"[bold]{chosen.name}[/] ({chosen.summary}) at B={batch}, T={length}, H={heads}, "
        f"D={head_dim}, {dtype}{', with gradients' if grad else ', forward only'}"
    )
    console.print(str(explanation), markup=False, highlight=False)
    if chosen.backend is not None:
        console.print(f"(the mechanism itself is defined by the {chosen.backend} backend)")


if __name__ == "__main__":
    app()
