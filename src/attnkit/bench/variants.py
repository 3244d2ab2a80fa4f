"""Speed of the catalog's function and layer mechanisms next to their plain counterparts.

- ``function`` mechanisms (RoPE variants, Music Transformer relative attention, ACT, linear
  attention, ...) run ``run(spec)(q, k, v)``; the baseline is causal softmax attention on the
  same ``q, k, v`` through ``attnkit.attention`` (``auto``).
- ``layer`` mechanisms (head layouts, gated outputs, GAAM, GPSA) run ``layer(spec)(x)``; the
  baseline is a plain GQA ``attnkit.nn.Attention`` layer of the same width, heads, RoPE and
  causal mask.

Both are timed in interleaved rounds on the same inputs (median), forward or
forward+backward; ``ratio = baseline ms / ms`` (> 1 is faster than the baseline).

With ``compiled``, each mechanism runs under ``torch.compile(fullgraph=True)`` and its baseline
is the same mechanism in eager mode: the cost or gain of compiling a model that uses it (the
compile itself happens in the warm-up call, untimed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from attnkit import catalog
from attnkit import nn as ak
from attnkit.api import attention
from attnkit.bench.measure import median, release_memory, timed
from attnkit.bench.speed import DTYPES
from attnkit.masks import causal


def default_mechanisms() -> tuple[str, ...]:
    """Every registered function and layer mechanism."""
    return tuple(name for name, m in catalog.MECHANISMS.items() if m.kind != "attention")


@dataclass(frozen=True)
class VariantsConfig:
    """The grid: mechanisms × lengths at ``B``, ``Hq`` heads (``Hkv`` KV heads), head dim ``D``."""

    mechanisms: tuple[str, ...] = field(default_factory=default_mechanisms)
    lengths: tuple[int, ...] = (1024, 4096)
    dtype: str = "float32"
    B: int = 1
    Hq: int = 4
    Hkv: int | None = 2
    D: int = 64
    repeats: int = 5
    backward: bool = False
    compiled: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in self.mechanisms:
            if catalog.get(name).kind == "attention":
                raise ValueError(
                    f"{name!r} is an attention-kwargs mechanism: time it with `attnkit bench "
                    f"--mechanisms {name}`"
                )
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of: {', '.join(DTYPES)}")


@dataclass
class VariantRecord:
    mechanism: str
    kind: str
    T: int
    median_ms: float | None = None
    baseline_ms: float | None = None
    ratio: float | None = None
    status: str = "ok"
    reason: str | None = None


def _plain_layer(spec: catalog.InputSpec) -> Any:
    return ak.Attention(
        ak.AttentionConfig(
            d_model=spec.Hq * spec.D, n_heads=spec.Hq, n_kv_heads=spec.kv_heads, head_dim=spec.D
        )
    )


def _steps(
    mechanism: catalog.Mechanism,
    spec: catalog.InputSpec,
    backward: bool,
    seed: int,
    compiled: bool = False,
) -> tuple[Callable[[], object], Callable[[], object]]:
    """``(candidate, baseline)`` zero-argument calls on shared inputs."""
    g = torch.Generator().manual_seed(seed)
    if mechanism.kind == "function":
        q, k, v = spec.make_inputs(seed=seed, requires_grad=backward)
        fn = mechanism.run(spec)
        tensors = (q, k, v)
        plain = fn if compiled else lambda q, k, v: attention(q, k, v, mask=causal())
    else:
        torch.manual_seed(seed)
        fn = mechanism.layer(spec).to(spec.dtype)
        plain = fn if compiled else _plain_layer(spec).to(spec.dtype)
        x = torch.randn(spec.B, spec.Tq, spec.Hq * spec.D, generator=g).to(spec.dtype)
        tensors = (x.requires_grad_(backward),)
    if compiled:
        fn = torch.compile(fn, fullgraph=True)

    def candidate() -> Any:
        return fn(*tensors)

    def baseline() -> Any:
        return plain(*tensors)

    def with_grad(fn: Callable[[], Any]) -> Callable[[], object]:
        if not backward:

            def forward() -> object:
                with torch.no_grad():
                    return fn()

            return forward

        def forward_backward() -> object:
            out = fn()
            return torch.autograd.grad(out.float().square().sum(), tensors)

        return forward_backward

    return with_grad(candidate), with_grad(baseline)


def run_variants_bench(config: VariantsConfig) -> list[VariantRecord]:
    """Time every mechanism of ``config`` against its baseline at each length."""
    records = []
    for name in config.mechanisms:
        mechanism = catalog.get(name)
        for T in config.lengths:
            record = VariantRecord(name, mechanism.kind, T)
            records.append(record)
            spec = catalog.InputSpec(
                B=config.B, Tq=T, Tk=T, Hq=config.Hq, Hkv=config.Hkv, D=config.D,
                dtype=DTYPES[config.dtype],
            )  # fmt: skip
            try:
                candidate, baseline = _steps(
                    mechanism, spec, config.backward, config.seed, config.compiled
                )
                candidate()
                baseline()
                ours, theirs = [], []
                for _ in range(config.repeats):
                    ours.append(timed(candidate))
                    theirs.append(timed(baseline))
            except Exception as error:  # one failing mechanism must not stop the run
                record.status, record.reason = "error", f"{type(error).__name__}: {error}"
                continue
            finally:
                release_memory()
            record.median_ms = median(ours) * 1e3
            record.baseline_ms = median(theirs) * 1e3
            record.ratio = record.baseline_ms / record.median_ms
    return records


def variants_table(records: list[VariantRecord], compiled: bool = False) -> Table:
    baseline = "the same mechanism eager" if compiled else "the plain counterpart"
    table = Table(
        title=f"function and layer mechanisms{' compiled' if compiled else ''} "
        f"(baseline: {baseline}; ratio = baseline ms / ms, > 1 is faster)"
    )
    for column in ("mechanism", "kind", "T", "ms", "baseline ms", "ratio", "note"):
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(
            r.mechanism,
            r.kind,
            str(r.T),
            "—" if r.median_ms is None else f"{r.median_ms:.2f}",
            "—" if r.baseline_ms is None else f"{r.baseline_ms:.2f}",
            "—" if r.ratio is None else f"{r.ratio:.2f}",
            r.reason or "",
        )
    return table


def write_variants(records: list[VariantRecord], config: VariantsConfig, out: str | Path) -> Path:
    """Write ``variants.json`` (config + records) into ``out``; returns its path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "variants.json"
    data = {"config": asdict(config), "records": [asdict(r) for r in records]}
    path.write_text(json.dumps(data, indent=1))
    return path
