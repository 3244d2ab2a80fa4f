"""The block-sparse benchmark: attnkit's block-sparse path vs FlexAttention vs SDPA, T = 4k…32k.

For each pattern, length and dtype, on the same ``q, k, v`` (``B=1, Hq=Hkv=4, D=64``):

- ``blocksparse`` and ``flex``: ``attnkit.attention(..., backend=...)`` with the pattern's mask
  (Flex gets attnkit's analytic BlockMask);
- ``sdpa_mask``: SDPA with the pattern as a dense boolean mask (skipped above
  ``sdpa_mask_max_T``: the mask alone is T² bytes);
- ``sdpa_dense``: SDPA without a mask — the throughput yardstick (timed once per length and
  dtype, shared by the patterns); for ``causal`` also ``sdpa_causal`` (``is_causal``);
- ``local_attention`` (the PyPI package of the same name, if installed) on the window pattern,
  and ``natten`` (NATTEN's ``na2d``; on the CPU it runs FlexAttention uncompiled, which
  materialises the scores, so it is timed up to ``natten_max_T``) on the 2-D neighborhood.

Candidates are timed in interleaved rounds; one whose first call takes over ``slow_call_s`` is
timed once. Per cell also the time to build the mask's tile structures once (``tiles``: a
``from_mask_mod`` pattern classifies its tiles by evaluating its predicate; ``window_256`` and
``window_256_mask_mod`` are the same window, built in and as a mask_mod). Derived per cell:
the live fraction of the block-sparse tiles, the GNA-style upper
bound on the speed-up over dense (1 / live fraction), the achieved speed-up
(``sdpa_dense / blocksparse``) and the efficiency per live tile (their ratio: 1.0 = every live
tile computed at dense SDPA's throughput).

What the machine allows: the run also measures its matmul throughput per dtype (a square
``MATMUL_PROBE`` GEMM, the most favourable shape, through the fastest GEMM this process has:
torch's matmul, and in float32 also the compiled kernel's own, ``probes.kernel_matmul``,
which on AVX-512 AMD CPUs outruns torch's MKL) and gives each cell a *floor*, the time of the
mask's kept pairs alone at that throughput (two GEMMs, ``4 · B · H · D`` flops per kept pair;
no softmax, no wasted pairs in partial tiles). An implementation that computes exact attention
with GEMMs cannot be meaningfully faster (tile-shaped GEMMs that stay in cache run at most a
few percent above the probe), so ``flex / floor`` is about the largest speed-up over Flex this
machine permits: where it is well below a goal, the goal is out of reach here, whatever the
kernel. The probe includes the kernel's own GEMM because MKL alone runs AVX2 code on AMD CPUs,
at half the core's AVX-512 throughput: a floor from MKL would call goals unreachable that
brgemm meets.

What our tiles allow: ``kernel_gemms`` times the compiled kernel's GEMMs on the same plan with
the per-row softmax steps skipped (``probes.gemms_alone``): the same tiles, partial ones
included, at the GEMM's speed on their shapes. ``flex / kernel_gemms`` (*reachable*) is the
largest speed-up over Flex a kernel built on these tiles and this GEMM could reach with a free
softmax; the gap between it and the ceiling is the GEMM's efficiency on tile-sized products plus
the pairs that partial tiles waste.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor

from attnkit import catalog, masks
from attnkit.api import attention
from attnkit.backends import blocksparse
from attnkit.bench import probes
from attnkit.bench.measure import median, release_memory, timed
from attnkit.bench.speed import DTYPES, allowed_pairs
from attnkit.call import AttentionCall
from attnkit.grid import balanced_grid
from attnkit.masks.base import Mask, private_caches


def _documents(T: int) -> Mask:
    return catalog.get("documents").build(catalog.InputSpec(Tq=T, Tk=T))["mask"]


#: The 2-D neighborhood pattern: 13x13 NA on the most nearly square grid of T tokens.
NA_KERNEL = 13


def _neighborhood(T: int) -> Mask:
    grid = balanced_grid(T, 2)
    return masks.neighborhood(tuple(min(NA_KERNEL, s) for s in grid), grid)


def _window_256_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """``sliding_window(255)`` written as a FlexAttention mask_mod (the 256 latest keys)."""
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 256)


#: Pattern name -> mask factory for length T (None = dense).
PATTERNS: dict[str, Callable[[int], Mask | None]] = {
    "dense": lambda T: None,
    "causal": lambda T: masks.causal(),
    "window_256": lambda T: masks.sliding_window(255),
    # the same window as a mask_mod: the same tiles, once its predicate has classified them
    "window_256_mask_mod": lambda T: masks.from_mask_mod(_window_256_mask_mod),
    "blocks_512": lambda T: masks.chunked(512),
    "block_causal_512": lambda T: masks.block_causal(512),
    "documents": _documents,
    "neighborhood_2d": _neighborhood,
}

#: Patterns of the "≥ 1.5× faster than Flex" goal.
FLEX_GOAL_PATTERNS = ("window_256", "blocks_512", "block_causal_512", "documents")


@dataclass(frozen=True)
class SparseConfig:
    patterns: tuple[str, ...] = tuple(PATTERNS)
    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    B: int = 1
    H: int = 4
    D: int = 64
    repeats: int = 3
    slow_call_s: float = 2.0
    sdpa_mask_max_T: int = 16384
    natten_max_T: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        for name in self.patterns:
            if name not in PATTERNS:
                raise ValueError(f"unknown pattern {name!r}; known: {', '.join(PATTERNS)}")
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")


@dataclass
class SparseCell:
    pattern: str
    T: int
    dtype: str
    live_fraction: float
    times_ms: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    #: the measured matmul throughput, and the kept pairs' GEMMs at it (module docstring)
    matmul_gflops: float | None = None
    floor_ms: float | None = None
    #: building the mask's tile structures at this length, once (a mask_mod's classification)
    tiles_ms: float | None = None

    def ms(self, name: str) -> float | None:
        return self.times_ms.get(name)

    def ceiling(self, over: str) -> float | None:
        """The largest speed-up over ``over`` any exact kernel could reach: its time / floor."""
        time = self.ms(over)
        return None if time is None or self.floor_ms is None else time / self.floor_ms

    def reachable(self, over: str) -> float | None:
        """The largest speed-up over ``over`` with our tiles and this GEMM (a free softmax)."""
        return self.speedup(over, of="kernel_gemms")

    @property
    def upper_bound(self) -> float:
        """GNA-style bound on the speed-up over dense: 1 / fraction of live tiles."""
        return 1.0 / self.live_fraction

    def speedup(self, over: str, of: str = "blocksparse") -> float | None:
        a, b = self.ms(over), self.ms(of)
        return None if a is None or b is None else a / b

    @property
    def efficiency(self) -> float | None:
        """Achieved speed-up over dense SDPA / the upper bound (1.0 = dense throughput per
        live tile)."""
        achieved = self.speedup("sdpa_dense")
        return None if achieved is None else achieved / self.upper_bound


def _local_attention(q: Tensor, k: Tensor, v: Tensor) -> Callable[[], object] | None:
    if importlib.util.find_spec("local_attention") is None:
        return None
    from local_attention import LocalAttention

    # window_size=w with exact_windowsize is attnkit's sliding_window(w): w + 1 keys
    module = LocalAttention(
        window_size=255, causal=True, look_backward=1, exact_windowsize=True,
        use_rotary_pos_emb=False, autopad=True,
    )  # fmt: skip
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return lambda: module(qt, kt, vt)


def _natten(q: Tensor, k: Tensor, v: Tensor) -> Callable[[], object] | None:
    if importlib.util.find_spec("natten") is None:
        return None
    import natten

    grid = balanced_grid(q.shape[1], 2)
    kernel = tuple(min(NA_KERNEL, s) for s in grid)
    qg, kg, vg = (x.view(x.shape[0], *grid, *x.shape[2:]) for x in (q, k, v))
    # On the CPU NATTEN runs FlexAttention uncompiled (it allows compilation on CUDA only)
    return lambda: natten.na2d(qg, kg, vg, kernel_size=kernel)


def _candidates(
    pattern: str, mask: Mask | None, q: Tensor, k: Tensor, v: Tensor, config: SparseConfig
) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    T = q.shape[1]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    calls: dict[str, Callable[[], object]] = {
        "blocksparse": lambda: attention(q, k, v, mask=mask, backend="blocksparse"),
        "flex": lambda: attention(q, k, v, mask=mask, backend="flex"),
    }
    skipped: dict[str, str] = {}
    gemms = probes.gemms_alone(AttentionCall(q, k, v, mask=mask))
    if gemms is None:
        skipped["kernel_gemms"] = "blocksparse's compiled kernel does not run this call"
    else:
        calls["kernel_gemms"] = gemms
    if pattern == "causal":
        calls["sdpa_causal"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    elif mask is not None and config.sdpa_mask_max_T >= T:
        dense = mask.dense(T, T)
        calls["sdpa_mask"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=dense)
    elif mask is not None:
        skipped["sdpa_mask"] = f"a dense mask at T={T} is {T * T / 2**30:.1f} GiB"
    if pattern == "neighborhood_2d":
        natten = _natten(q, k, v)
        if natten is None:
            skipped["natten"] = "package natten not installed"
        elif config.natten_max_T < T:
            skipped["natten"] = (
                f"NATTEN's CPU path (uncompiled FlexAttention) materialises the scores: "
                f"{q.shape[0] * q.shape[2] * T * T * 4 / 2**30:.0f} GiB at T={T}"
            )
        else:
            calls["natten"] = natten
    if pattern == "window_256":
        local = _local_attention(q, k, v)
        if local is None:
            skipped["local_attention"] = "package local-attention not installed"
        else:
            calls["local_attention"] = local
    return calls, skipped


def _dense_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Callable[[], object]:
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return lambda: F.scaled_dot_product_attention(qt, kt, vt)


def _time(
    calls: dict[str, Callable[[], object]], config: SparseConfig, failed: dict[str, str]
) -> dict[str, float]:
    """Median ms of each call; a call that raises is recorded in ``failed`` (e.g. inductor's
    compiled Flex kernel runs out of memory at T=32k) and the others go on."""
    first = {}
    for name, call in list(calls.items()):
        try:
            call()  # compiles Flex, builds block masks and plans
            first[name] = timed(call)
        except (RuntimeError, MemoryError) as error:
            failed[name] = f"{type(error).__name__}: {error}"[:200]
            del calls[name]
    rounds = [n for n in calls if first[n] <= config.slow_call_s]
    times = {n: [first[n]] for n in calls}
    for _ in range(config.repeats - 1):
        for name in rounds:
            times[name].append(timed(calls[name]))
    return {name: median(values) * 1e3 for name, values in times.items()}


#: The GEMM that measures the machine's matmul throughput: square, the most favourable shape.
MATMUL_PROBE = 2048


def _square_matmuls(dtype: torch.dtype) -> list[Callable[[], object]]:
    """``MATMUL_PROBE``-sized square products in ``dtype``: torch's matmul, and in float32 the
    compiled kernel's GEMM (rows padded off 4 KB multiples: 2048-float rows would share L1
    sets)."""
    a, b = (torch.randn(MATMUL_PROBE, MATMUL_PROBE).to(dtype) for _ in range(2))
    calls: list[Callable[[], object]] = [lambda: a @ b]
    if dtype == torch.float32 and blocksparse.kernel_gemm(dtype) is not None:
        padded = MATMUL_PROBE + 16
        x, y, out = (torch.randn(MATMUL_PROBE, padded)[:, :MATMUL_PROBE] for _ in range(3))
        calls.append(lambda: probes.kernel_matmul(x, y, out))
    return calls


def matmul_gflops(dtype: torch.dtype, repeats: int = 5) -> float:
    """Median GFLOP/s of the fastest ``MATMUL_PROBE``-sized square matmul in ``dtype`` on all
    threads (:func:`_square_matmuls`)."""
    best = 0.0
    for call in _square_matmuls(dtype):
        call()  # warm-up: oneDNN builds its kernel, pages are touched
        seconds = median([timed(call) for _ in range(repeats)])
        best = max(best, 2 * MATMUL_PROBE**3 / seconds / 1e9)
    return best


def run_sparse_bench(
    config: SparseConfig, progress: Callable[[int, int, str], None] | None = None
) -> list[SparseCell]:
    cells: list[SparseCell] = []
    total = len(config.patterns) * len(config.lengths) * len(config.dtypes)
    for dtype in config.dtypes:
        gflops = matmul_gflops(DTYPES[dtype])
        for T in config.lengths:
            g = torch.Generator().manual_seed(config.seed + T)
            q, k, v = (
                torch.randn(config.B, T, config.H, config.D, generator=g).to(DTYPES[dtype])
                for _ in range(3)
            )
            with torch.no_grad():
                dense_ms = _time({"sdpa_dense": _dense_sdpa(q, k, v)}, config, {})
                for pattern in config.patterns:
                    if progress is not None:
                        progress(len(cells), total, f"{pattern} T={T} {dtype}")
                    with private_caches():
                        mask = PATTERNS[pattern](T)
                        start = time.perf_counter()  # the kernel's choice of tiles builds them
                        tiles = blocksparse.tile_shape(AttentionCall(q, k, v, mask=mask))
                        structure = None if mask is None else mask.blocks(T, T, *tiles)
                        tiles_ms = (time.perf_counter() - start) * 1e3
                    live = 1.0 if structure is None else structure.live_fraction()
                    spec = catalog.InputSpec(config.B, T, T, config.H, D=config.D)
                    pairs = allowed_pairs(mask, spec)
                    cell = SparseCell(pattern, T, dtype, live, matmul_gflops=gflops)
                    cell.tiles_ms = tiles_ms
                    cell.floor_ms = pairs * 4 * config.D / (gflops * 1e6)
                    calls, cell.skipped = _candidates(pattern, mask, q, k, v, config)
                    cell.times_ms = dense_ms | _time(calls, config, cell.skipped)
                    cells.append(cell)
                    release_memory()
    return cells


# -- targets, table, plot ----------------------------------------------------------------------


@dataclass(frozen=True)
class SparseTarget:
    name: str
    goal: str
    value: float | None
    passed: bool | None
    detail: str


def sparse_targets(cells: list[SparseCell]) -> list[SparseTarget]:
    """The sparse benchmark's goals, computed from ``cells`` (worst cell for each)."""

    Row = tuple[float, str, float | None, float | None]

    def worst(rows: list[Row], name: str, goal: str, bar: float) -> SparseTarget:
        """The worst row; rows carry the machine's ceiling and the ratio our tiles could reach
        (``SparseCell.ceiling``, ``reachable``) where known, and the detail says how many
        failing cells could not reach the goal on this machine, or with these tiles."""
        if not rows:
            return SparseTarget(name, goal, None, None, "no cell measured")
        value, where, ceiling, reachable = min(rows, key=lambda row: row[0])
        bounds = [f"ceiling {ceiling:.2f}×"] if ceiling is not None else []
        bounds += [f"reachable {reachable:.2f}×"] if reachable is not None else []
        detail = f"worst: {where}" + (f" ({', '.join(bounds)})" if bounds else "")
        failing = [row for row in rows if row[0] < bar]
        beyond = [row for row in failing if row[2] is not None and row[2] < bar]
        unreachable = [row for row in failing if row[3] is not None and row[3] < bar]
        if beyond:
            detail += f"; {len(beyond)} of {len(failing)} failing cells have a ceiling < {bar}×"
        if unreachable:
            detail += (
                f"; in {len(unreachable)} of {len(failing)} the kernel's GEMMs alone are "
                f"slower than the goal"
            )
        return SparseTarget(name, goal, value, value >= bar, detail)

    def label(c: SparseCell) -> str:
        return f"{c.pattern} T={c.T} {c.dtype}"

    vs_flex = [
        (s, label(c), c.ceiling("flex"), c.reachable("flex"))
        for c in cells
        if c.pattern in FLEX_GOAL_PATTERNS and (s := c.speedup("flex")) is not None
    ]
    efficiency = [
        (e, label(c), None, None)
        for c in cells
        if c.pattern != "dense" and (e := c.efficiency) is not None
    ]
    causal32 = [
        (s, label(c), c.ceiling("sdpa_causal"), c.reachable("sdpa_causal"))
        for c in cells
        if c.pattern == "causal" and c.dtype == "float32" and (s := c.speedup("sdpa_causal"))
    ]
    half = [
        (s, label(c), c.ceiling(baseline), c.reachable(baseline))
        for c in cells
        if c.dtype == "bfloat16"
        and c.pattern in ("dense", "causal")
        and (s := c.speedup(baseline := "sdpa_dense" if c.pattern == "dense" else "sdpa_causal"))
    ]
    return [
        worst(vs_flex, "blocksparse vs Flex (window, blocks, documents)", "≥ 1.5×", 1.5),
        worst(efficiency, "throughput per live tile vs dense SDPA", "≥ 0.70", 0.7),
        worst(causal32, "causal fp32: blocksparse vs SDPA is_causal", "≥ 1.3×", 1.3),
        worst(half, "dense and causal bf16: blocksparse vs SDPA bf16", "≥ 1.5×", 1.5),
    ]


def _kernel_gemms() -> dict[str, str | None]:
    """The GEMM the compiled kernel runs each of its dtypes on (``blocksparse.kernel_gemm``)."""
    return {
        str(d).removeprefix("torch."): blocksparse.kernel_gemm(d) for d in blocksparse.KERNEL_DTYPES
    }


def sparse_table(cells: list[SparseCell]) -> Table:
    names = list(dict.fromkeys(n for c in cells for n in c.times_ms))
    gemms = ", ".join(f"{name} {gemm}" for name, gemm in _kernel_gemms().items())
    table = Table(title=f"block-sparse attention, ms (forward; the kernel's GEMMs: {gemms})")
    columns = ("pattern", "T", "dtype", "live", "tiles", *names, "floor", "vs flex", "reachable",
               "ceiling", "bound", "achieved", "eff")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("pattern", "dtype") else "right")

    def fmt(x: float | None, spec: str = ".1f") -> str:
        return "—" if x is None else format(x, spec)

    for c in cells:
        table.add_row(
            c.pattern,
            str(c.T),
            c.dtype,
            f"{c.live_fraction:.3f}",
            fmt(c.tiles_ms, ".2f"),
            *(fmt(c.ms(n)) for n in names),
            fmt(c.floor_ms),
            fmt(c.speedup("flex"), ".2f"),
            fmt(c.reachable("flex"), ".2f"),
            fmt(c.ceiling("flex"), ".2f"),
            fmt(c.upper_bound, ".1f"),
            fmt(c.speedup("sdpa_dense"), ".1f"),
            fmt(c.efficiency, ".2f"),
        )
    return table


def plot_density(cells: list[SparseCell], path: Path) -> None:
    """Time vs density at the largest length, one panel per dtype: the ideal line (dense SDPA
    × density), blocksparse, Flex, SDPA with the mask, and dense SDPA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(c.dtype for c in cells))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.2), squeeze=False)
    for ax, dtype in zip(axes.flat, dtypes, strict=True):
        T = max(c.T for c in cells if c.dtype == dtype)
        rows = sorted(
            (c for c in cells if c.dtype == dtype and c.T == T), key=lambda c: c.live_fraction
        )
        dense = rows[0].ms("sdpa_dense")
        density = [c.live_fraction for c in rows]
        if dense is not None:
            ax.plot([0, 1], [0, dense], "k--", label="ideal: dense SDPA × density")
            ax.axhline(dense, color="gray", linewidth=1, label="SDPA dense")
        for name, marker in (("blocksparse", "o"), ("flex", "s"), ("sdpa_mask", "^")):
            points = [(c.live_fraction, c.ms(name)) for c in rows if c.ms(name) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker=marker, linestyle="-", label=name)
        for c in rows:
            ax.annotate(c.pattern, (c.live_fraction, c.ms("blocksparse") or 0), fontsize=7)
        ax.set_xlabel("density (live tiles of blocksparse's tile shape)")
        ax.set_ylabel("ms (forward)")
        ax.set_yscale("log")
        ax.set_xlim(0, 1.05 if density else 1)
        ax.set_title(f"T={T}, {dtype}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sparse(cells: list[SparseCell], config: SparseConfig, out: str | Path) -> dict[str, Path]:
    """Write ``sparse.json`` and ``sparse.png`` into ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "sparse.json", "plot": folder / "sparse.png"}
    data: dict[str, Any] = {
        "config": asdict(config),
        "cells": [asdict(c) | {"efficiency": c.efficiency} for c in cells],
        "targets": [asdict(t) for t in sparse_targets(cells)],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "kernel_gemms": _kernel_gemms(),
    }
    paths["json"].write_text(json.dumps(data, indent=1))
    plot_density(cells, paths["plot"])
    return paths
