"""The speed benchmark: every backend that runs a mechanism, ``auto`` and the SDPA baseline,
side by side on the same inputs in the same run, each verified against the float64 reference.

For each cell (mechanism × length T × dtype):

- the inputs ``q, k, v [B, T, H, D]`` and the mechanism's mask/score/bias are built once;
- candidates: each backend of ``attnkit.backends.BACKENDS`` whose ``supports`` accepts the call
  (refusals are recorded with their reason), ``auto``, and the **baseline**: PyTorch's
  ``scaled_dot_product_attention`` in the form a user would write without attnkit — no mask for
  dense attention, ``is_causal=True`` for a plain causal mask, otherwise the dense boolean mask
  ``mask.dense(T, T)`` (plus the bias as a float mask). SDPA computes only softmax, so for
  sigmoid/softplus the baseline is softmax SDPA over the same mask: a cost yardstick, not the
  same function (it is labelled so);
- per candidate: one first call (compilation and cache fills; ``first_call_s`` = its time minus
  the median), one call with sampled peak memory (``attnkit.bench.measure``), then timed rounds
  that run every candidate once in turn, so machine noise hits all of them alike;
- one-off mask building is timed on its own, from a freshly built (uncached) mask, with the
  structure the backend needs (``MASK_BUILDERS``);
- correctness: the first time a (mechanism, dtype, candidate) is timed at ``T <= verify_max_T``,
  its output (and gradients with ``backward``) on the cell's inputs are checked against the
  float64 reference with ``attnkit.testing.check_against_reference`` (the 2× rule). A ratio to
  the baseline is reported only for verified candidates.

Derived numbers: ``ratio`` = the median over rounds of baseline time / candidate time in the
same round (> 1: faster than the baseline; ``measure.paired_ratio``), and
density-adjusted GFLOP/s ``= 2 (D + Dv) · allowed (q, k) pairs over batch and heads / time``
(forward; × 3.5 for forward + backward), so a kernel that computes masked-out pairs gets no
credit for them.
"""

from __future__ import annotations

import datetime
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import attnkit
from attnkit import api, backends, calibration, catalog, machine
from attnkit.bench.measure import (
    median,
    paired_ratio,
    peak_rss_increase_mb,
    release_memory,
    timed,
)
from attnkit.call import AttentionCall
from attnkit.masks.base import Mask, private_caches, row_counts
from attnkit.scores import Softmax
from attnkit.testing import check_against_reference
from attnkit.version import __version__

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

DEFAULT_MECHANISMS = (
    "softmax",
    "causal",
    "sliding_window",
    "sinks_window",
    "documents",
    "sigmoid",
    "softplus_l1",
    "alibi",
)

#: Forward + backward costs about 3.5 forward passes (FlashAttention's convention: the
#: backward recomputes the scores and does 2.5× the forward matmul work).
BACKWARD_FLOP_FACTOR = 3.5

MEMORY_METHOD = (
    "peak RSS increase, sampled: /proc/self/statm read every ~1 ms in a background thread "
    "during one call, minus the RSS before it (after gc.collect and malloc_trim); a lower bound"
)


@dataclass(frozen=True)
class SpeedConfig:
    """What to run.

    The default grid: 8 mechanisms × T = 1k and 4k × fp32/bf16, at B=1, Hq=Hkv=4, D=64, sized
    so that ``attnkit bench`` on a fresh 2-core machine, FlexAttention's compilations (once
    per shape, mask and score: 32 here) and the kernels' builds included, stays within
    minutes; ``--lengths 1024,2048,4096,8192`` runs the longer grid. Fewer heads make calls so
    short that fixed per-call costs (dispatch, FlexAttention's BlockMask constructor) stop
    being representative of real models.

    ``repeats`` is the minimum number of timed rounds per cell; short cells get more rounds
    (up to ``max_repeats``) until a cell's rounds take ``round_budget_s``. A candidate far
    behind in its cell — one call over ``slow_call_s`` and over ``far_behind`` × the fastest
    candidate computing the same function — is timed once (its memory-sampled call) instead:
    its place in the ranking needs no median, and at T=8192 it would dominate the run time.
    A backend ``drop_slower_than`` × slower than its cell's fastest at two lengths in a row
    is not timed at the next lengths of that mechanism and dtype (recorded as skipped).
    """

    mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS
    lengths: tuple[int, ...] = (1024, 4096)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    B: int = 1
    Hq: int = 4
    Hkv: int | None = None
    D: int = 64
    repeats: int = 3
    max_repeats: int = 25
    round_budget_s: float = 2.0
    slow_call_s: float = 1.0
    far_behind: float = 4.0
    drop_slower_than: float = 10.0
    backward: bool = False
    #: Backends skipped above a length, with the reason (the dense oracle is O(T^2)).
    skip_above: dict[str, int] = field(default_factory=lambda: {"reference": 2048})
    verify_max_T: int = 2048
    seed: int = 0
    #: ``cpu`` or ``cuda`` (``cuda:N``): where the inputs live and every candidate runs.
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in self.mechanisms:
            kind = catalog.get(name).kind
            if kind != "attention":
                raise ValueError(
                    f"{name!r} is a {kind} mechanism: time it with `attnkit bench variants "
                    f"--mechanisms {name}`"
                )
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
        if self.repeats < 1 or self.max_repeats < self.repeats:
            raise ValueError("need 1 <= repeats <= max_repeats")


def quick_config(**overrides: Any) -> SpeedConfig:
    """A tiny grid (T=128, 256; fp32): seconds of attention, plus one FlexAttention
    compilation per mechanism and length (seconds each, less from a warm inductor cache)."""
    options: dict[str, Any] = dict(
        lengths=(128, 256),
        dtypes=("float32",),
        Hq=2,
        D=32,
        repeats=1,
        max_repeats=1,
        round_budget_s=0.0,
    )
    options.update(overrides)
    return SpeedConfig(**options)


@dataclass
class Record:
    """One (mechanism, T, dtype, candidate) result. ``role`` is ``backend``, ``auto`` or
    ``baseline``; ``status`` is ``ok``, ``skipped`` (``reason`` says why) or ``error``."""

    mechanism: str
    T: int
    dtype: str
    backend: str
    role: str
    status: str
    reason: str | None = None
    runs_on: str | None = None
    median_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    ratio: float | None = None
    gflops: float | None = None
    peak_mb: float | None = None
    first_call_s: float | None = None
    mask_ms: float | None = None
    #: For auto: the median time of its decision alone (validation + backend selection).
    dispatch_ms: float | None = None
    verified: bool | None = None
    verified_at_T: int | None = None
    check: str | None = None

    @property
    def ran(self) -> bool:
        return self.status == "ok" and self.median_ms is not None


@dataclass
class SpeedResults:
    config: dict[str, Any]
    records: list[Record]

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "records": [asdict(r) for r in self.records]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpeedResults:
        return cls(data["config"], [Record(**r) for r in data["records"]])

    def cell(self, mechanism: str, T: int, dtype: str) -> list[Record]:
        return [r for r in self.records if (r.mechanism, r.T, r.dtype) == (mechanism, T, dtype)]


# -- the baseline ------------------------------------------------------------------------


def baseline_attn_mask(
    kwargs: dict[str, Any], Tq: int, Tk: int, dtype: torch.dtype, device: str = "cpu"
) -> Tensor | None:
    """The ``attn_mask`` of the SDPA baseline: None (dense or ``is_causal``), the dense
    boolean mask ``[Bm, Hm, Tq, Tk]``, or with a bias the float mask ``bias`` / ``-inf``."""
    mask, bias = kwargs.get("mask"), kwargs.get("bias")
    if mask is None and bias is None:
        return None
    if bias is None and mask is not None and mask.is_top_left_causal(Tq, Tk):
        return None
    allowed = None if mask is None else mask.dense(Tq, Tk, device)
    if bias is None:
        return allowed
    float_mask = bias.dense(Tq, Tk, device).detach().to(dtype).unsqueeze(0)
    if allowed is not None:
        float_mask = float_mask.masked_fill(~allowed, float("-inf"))
    return float_mask


def baseline_label(kwargs: dict[str, Any], Tq: int, Tk: int) -> str:
    """How the baseline runs, e.g. ``sdpa(dense bool mask + bias)``."""
    mask, bias = kwargs.get("mask"), kwargs.get("bias")
    if mask is None:
        form = "no mask"
    elif bias is None and mask.is_top_left_causal(Tq, Tk):
        form = "is_causal"
    else:
        form = "dense bool mask"
    if bias is not None:
        form += " + bias as float mask"
    return f"sdpa({form})"


def _same_function_as_sdpa(score: Any) -> bool:
    return score is None or (type(score) is Softmax and score.softcap is None)


def _baseline_fn(kwargs: dict[str, Any], attn_mask: Tensor | None, scale: float):
    is_causal = attn_mask is None and kwargs.get("mask") is not None

    def run(q: Tensor, k: Tensor, v: Tensor, **_: Any) -> Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)

    return run


# -- one-off mask building ---------------------------------------------------------------

MaskBuilder = Callable[[dict[str, Any], "catalog.InputSpec"], object]


def _block_builder(module: Any) -> MaskBuilder:
    block_q = getattr(module, "BLOCK_Q", 128)
    block_k = getattr(module, "BLOCK_K", 128)

    def build(kwargs: dict[str, Any], spec: catalog.InputSpec) -> object:
        return kwargs["mask"].blocks(spec.Tq, spec.Tk, block_q, block_k, spec.device)

    return build


def _sdpa_builder(kwargs: dict[str, Any], spec: catalog.InputSpec) -> object:
    q, k, v = (
        torch.empty(spec.B, T, H, spec.D, dtype=spec.dtype)
        for T, H in ((spec.Tq, spec.Hq), (spec.Tk, spec.kv_heads), (spec.Tk, spec.kv_heads))
    )
    return backends.sdpa.dense_attn_mask(AttentionCall(q, k, v, **kwargs))


def mask_builders() -> dict[str, MaskBuilder]:
    """The one-off structure each backend derives from a mask, by backend name: SDPA's dense
    mask, the chunked backend's block structure, FlexAttention's BlockMask (when the flex
    backend exposes ``build_block_mask``). Backends not listed get no mask-building time
    (the reference evaluates the mask inside every call)."""
    builders: dict[str, MaskBuilder] = {
        "sdpa": _sdpa_builder,
        "chunked": _block_builder(backends.chunked),
    }
    flex = backends.flex
    if hasattr(flex, "build_block_mask"):
        builders["flex"] = lambda kwargs, spec: flex.build_block_mask(
            kwargs["mask"], spec.Tq, spec.Tk, spec.device
        )
    return builders


def _mask_build_ms(
    mechanism: catalog.Mechanism, spec: catalog.InputSpec, builder: MaskBuilder, tries: int = 3
) -> float:
    """Median time to build the structure from a fresh mask with caches of its own (equal
    masks otherwise share theirs; one try when a build takes over 50 ms: the dense masks at
    large T)."""
    times: list[float] = []
    while len(times) < tries and sum(times) < 50.0:
        with private_caches():
            fresh = mechanism.build(spec)
            times.append(timed(lambda fresh=fresh: builder(fresh, spec)) * 1e3)
    return median(times)


# -- counting ----------------------------------------------------------------------------


def allowed_pairs(mask: Mask | None, spec: catalog.InputSpec) -> int:
    """Number of (query, key) pairs attention computes, summed over batch and query heads."""
    if mask is None:
        return spec.B * spec.Hq * spec.Tq * spec.Tk
    counts = row_counts(mask, spec.Tq, spec.Tk, spec.device)  # [Bm, Hm, Tq]
    Bm, Hm = counts.shape[:2]
    return int(counts.sum()) * (spec.B // Bm) * (spec.Hq // Hm)


def attention_flops(mask: Mask | None, spec: catalog.InputSpec, backward: bool) -> float:
    """Density-adjusted FLOPs: ``2 (D + Dv)`` per allowed pair (q·k and p·v), × 3.5 with
    the backward pass."""
    flops = 2.0 * (spec.D + spec.D) * allowed_pairs(mask, spec)
    return flops * (BACKWARD_FLOP_FACTOR if backward else 1.0)


# -- one cell ----------------------------------------------------------------------------


@dataclass
class GridState:
    """What a cell passes on to later cells of the same mechanism and dtype, keyed by
    ``(mechanism, dtype, candidate)``."""

    #: ``(passed, summary, T checked at)`` of the correctness check.
    verified: dict[tuple[str, str, str], tuple[bool, str, int]] = field(default_factory=dict)
    #: ``median / the cell's fastest median`` of the backend, per length timed so far.
    slowdowns: dict[tuple[str, str, str], dict[int, float]] = field(default_factory=dict)


@dataclass
class _Candidate:
    record: Record
    fn: Callable[..., Tensor]
    builder: MaskBuilder | None
    same_function: bool
    #: For auto: the backend it runs, whose mask-building time it shares.
    runs_backend: str | None = None
    step: Callable[[], object] = lambda: None
    first_s: float = 0.0
    memory_call_s: float = 0.0

    @property
    def estimate_s(self) -> float:
        """One call's time: the faster of the first call (which may include compilation)
        and the memory-sampled call."""
        return min(self.first_s, self.memory_call_s)


def _make_step(fn, q, k, v, grad_out: Tensor | None) -> Callable[[], object]:
    """One timed call; on a GPU it waits for the device, so wall time is the kernels' time."""
    wait = torch.cuda.synchronize if q.device.type == "cuda" else lambda: None

    def forward() -> object:
        with torch.no_grad():
            out = fn(q, k, v)
        wait()
        return out

    def forward_backward() -> object:
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        wait()
        return grads

    return forward if grad_out is None else forward_backward


def _candidates(
    mechanism: catalog.Mechanism,
    spec: catalog.InputSpec,
    kwargs: dict[str, Any],
    inputs: tuple[Tensor, Tensor, Tensor],
    config: SpeedConfig,
    state: GridState,
) -> tuple[list[_Candidate], list[Record]]:
    """The candidates to time in a cell, and the records of those that cannot run."""
    T, dtype = spec.Tk, _dtype_name(spec.dtype)
    with torch.enable_grad() if config.backward else torch.no_grad():
        call = AttentionCall(*inputs, **kwargs)
        explanation = attnkit.explain(*inputs, **kwargs)
    builders = mask_builders() if kwargs.get("mask") is not None else {}

    def record(name: str, role: str, status: str = "ok", **extra: Any) -> Record:
        return Record(mechanism.name, T, dtype, name, role, status, **extra)

    def attention_fn(name: str) -> Callable[..., Tensor]:
        return lambda q, k, v, **_: attnkit.attention(q, k, v, backend=name, **kwargs)

    live: list[_Candidate] = []
    skipped: list[Record] = []
    for name, backend in backends.BACKENDS.items():
        reason = backend.supports(call)
        limit = config.skip_above.get(name)
        if reason is None and limit is not None and spec.Tk > limit:
            reason = (
                f"skipped above T={limit}: the dense {name} backend is O(T^2) in memory and time"
            )
        # Two lengths in a row, so that one disturbed cell cannot drop a backend.
        history = sorted(state.slowdowns.get((mechanism.name, dtype, name), {}).items())[-2:]
        behind = len(history) == 2 and min(f for _, f in history) >= config.drop_slower_than
        if reason is None and behind:
            reason = (
                f"over {config.drop_slower_than:g}x slower than the fastest candidate at "
                f"T={history[0][0]} and T={history[1][0]}: not timed at larger T"
            )
        if reason is not None:
            skipped.append(record(name, "backend", "skipped", reason=reason))
        else:
            live.append(
                _Candidate(record(name, "backend"), attention_fn(name), builders.get(name), True)
            )

    chosen = explanation.chosen
    limit = config.skip_above.get(chosen)
    if limit is not None and spec.Tk > limit:
        reason = f"auto picks {chosen}, which is skipped above T={limit}"
        skipped.append(record("auto", "auto", "skipped", runs_on=chosen, reason=reason))
    else:
        auto = record("auto", "auto", runs_on=f"{chosen}: {explanation.why}")
        auto.dispatch_ms = _dispatch_ms(inputs, kwargs, config.backward)
        live.append(_Candidate(auto, attention_fn("auto"), builders.get(chosen), True, chosen))

    # Nothing caches dense masks or biases on these fresh objects, so building the
    # baseline's mask here is also its one-off mask-building time.
    start = time.perf_counter()
    attn_mask = baseline_attn_mask(kwargs, spec.Tq, spec.Tk, spec.dtype, spec.device)
    base_mask_ms = (time.perf_counter() - start) * 1e3 if attn_mask is not None else None
    base = record("baseline", "baseline", runs_on=baseline_label(kwargs, spec.Tq, spec.Tk))
    base.mask_ms = base_mask_ms
    same = _same_function_as_sdpa(kwargs.get("score"))
    if not same:
        base.reason = (
            f"softmax stand-in: SDPA cannot compute {kwargs['score'].describe()}, so the "
            "baseline is softmax attention over the same mask (a cost yardstick)"
        )
    live.append(_Candidate(base, _baseline_fn(kwargs, attn_mask, call.scale), None, same))
    return live, skipped


def _dispatch_ms(
    inputs: tuple[Tensor, Tensor, Tensor], kwargs: dict[str, Any], grad: bool
) -> float:
    """Median time of auto's decision alone: building the call and selecting its backend.

    Timed apart from the attention itself because auto's total minus its backend's total is
    the difference of two noisy medians of nearly equal numbers."""

    def decide() -> object:
        call = AttentionCall(*inputs, **kwargs)
        return api._select(call, "auto")  # exactly what attention() does before running

    with torch.enable_grad() if grad else torch.no_grad():
        decide()  # warm any per-mask caches the first decision fills
        return median([timed(decide) for _ in range(25)]) * 1e3


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _verify(
    candidate: _Candidate,
    inputs: tuple[Tensor, Tensor, Tensor],
    kwargs: dict[str, Any],
    grads: bool,
) -> tuple[bool, str]:
    try:
        report = check_against_reference(candidate.fn, *inputs, grads=grads, **kwargs)
    except Exception as error:  # a crash in the check is a failed check, not a crashed run
        return False, f"FAILED: the check raised {type(error).__name__}: {error}"
    worst = max(report.comparisons, key=lambda c: c.error / c.bound)
    summary = (
        f"{'passed' if report.ok else 'FAILED'}: worst {worst.name} error {worst.error:.2e} "
        f"vs bound {worst.bound:.2e} (2x the same-dtype reference's error + floor)"
    )
    return report.ok, summary


def _measure_first_calls(
    c: _Candidate, mechanism: catalog.Mechanism, spec: catalog.InputSpec
) -> None:
    """First call (compilation, cache fills), then a memory-sampled call whose wall time
    estimates one call, then the one-off mask building from a fresh mask."""
    c.first_s = timed(c.step)
    c.record.peak_mb, c.memory_call_s = peak_rss_increase_mb(c.step)
    if c.builder is not None:
        c.record.mask_ms = _mask_build_ms(mechanism, spec, c.builder)


def run_cell(
    mechanism: catalog.Mechanism,
    T: int,
    dtype: str,
    config: SpeedConfig,
    state: GridState | None = None,
) -> list[Record]:
    """Time every candidate on one (mechanism, T, dtype) and return their records.
    ``state`` carries correctness checks and slowdowns from earlier cells of the grid."""
    state = GridState() if state is None else state
    verified = state.verified
    spec = catalog.InputSpec(
        B=config.B, Tq=T, Tk=T, Hq=config.Hq, Hkv=config.Hkv, D=config.D, dtype=DTYPES[dtype],
        device=config.device,
    )  # fmt: skip
    kwargs = mechanism.build(spec)
    inputs = spec.make_inputs(seed=config.seed, requires_grad=config.backward)
    grad_out = None
    if config.backward:
        g = torch.Generator().manual_seed(config.seed + 1)
        grad_out = torch.randn(spec.B, T, spec.Hq, spec.D, generator=g)
        grad_out = grad_out.to(spec.dtype).to(spec.device)
    live, skipped = _candidates(mechanism, spec, kwargs, inputs, config, state)

    measured = {c.record.backend: c for c in live if c.record.role == "backend"}
    for c in live:
        c.step = _make_step(c.fn, *inputs, grad_out)
        shared = measured.get(c.runs_backend) if c.runs_backend else None
        if shared is not None and shared.record.status == "ok":
            c.builder = None  # the same structure was just timed for that backend
        try:
            _measure_first_calls(c, mechanism, spec)
        except Exception as error:  # one failing backend must not stop the benchmark
            c.record.status, c.record.reason = "error", f"{type(error).__name__}: {error}"
        if shared is not None and c.builder is None:
            c.record.mask_ms = shared.record.mask_ms
    live = [c for c in live if c.record.status == "ok"]

    # "Behind" is measured against candidates computing the same function, never against
    # a softmax stand-in baseline.
    peers = [c for c in live if c.same_function]
    fastest = min((c.estimate_s for c in peers), default=0.0)
    slow_limit = max(config.slow_call_s, config.far_behind * fastest)
    far_behind = [c for c in live if c.estimate_s > slow_limit]
    timed_live = [c for c in live if c.estimate_s <= slow_limit]
    for c in far_behind:
        c.record.times_ms.append(c.memory_call_s * 1e3)
    round_s = sum(c.estimate_s for c in timed_live)
    rounds = config.repeats
    if round_s > 0:
        wanted = math.ceil(config.round_budget_s / round_s)
        rounds = max(config.repeats, min(config.max_repeats, wanted))
    release_memory()
    for i in range(rounds):
        # Rotating the order spreads the cost of following a memory-hungry candidate (cache
        # and page-fault effects) over all candidates; the median drops it.
        shift = i % max(1, len(timed_live))
        for c in timed_live[shift:] + timed_live[:shift]:
            c.record.times_ms.append(timed(c.step) * 1e3)

    # Checked after timing so that the first call above pays any compilation.
    for c in live:
        key = (mechanism.name, dtype, c.record.backend)
        if c.same_function and key not in verified and spec.Tk <= config.verify_max_T:
            verified[key] = (*_verify(c, inputs, kwargs, config.backward), T)
        if c.same_function and key in verified:
            c.record.verified, c.record.check, c.record.verified_at_T = verified[key]

    flops = attention_flops(kwargs.get("mask"), spec, config.backward)
    baseline = None
    for c in live:
        r = c.record
        r.median_ms = median(r.times_ms)
        r.first_call_s = max(0.0, c.first_s - r.median_ms / 1e3)
        r.gflops = flops / (r.median_ms / 1e3) / 1e9
        if r.role == "baseline":
            baseline = r
    fastest_ms = min((c.record.median_ms for c in peers), default=None)
    for c in live:
        r = c.record
        if r.role == "baseline":
            r.ratio = 1.0
        elif baseline is not None and r.verified:
            r.ratio = paired_ratio(baseline.times_ms, r.times_ms)
        if r.role == "backend" and fastest_ms:
            history = state.slowdowns.setdefault((mechanism.name, dtype, r.backend), {})
            history[T] = r.median_ms / fastest_ms
    return [c.record for c in live] + skipped


# -- the grid ----------------------------------------------------------------------------


def describe_config(config: SpeedConfig) -> dict[str, Any]:
    """The run's configuration and machine (its CPU flags in force, and the cost table ``auto``
    ranked by), stored with the results."""
    table = calibration.table_for(config.device)
    return {
        **asdict(config),
        "Hkv": config.Hkv or config.Hq,
        "torch": torch.__version__,
        "attnkit": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": machine.cpu_flags_line(),
        "device": machine.capabilities(config.device).describe(),
        "cost_table": {
            "device": table.capabilities.describe(),
            "source": table.source,
            "entries": [list(row) for row in table.rows()],
        },
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "timing": (
            "median over rounds after one first call and one memory-sampled call; "
            "each round runs every candidate once in turn; a candidate far behind the "
            f"fastest of its cell (> {config.far_behind:g}x and > {config.slow_call_s:g} s) "
            "is timed once, by its memory-sampled call; a backend "
            f"{config.drop_slower_than:g}x slower than its cell's fastest at two lengths in a "
            "row is not timed at larger T; the order of candidates rotates every round"
        ),
        "flops": (
            "density-adjusted: 2*(D+Dv) per allowed (q,k) pair over batch and heads"
            + (", x3.5 for forward+backward" if config.backward else ", forward only")
        ),
        "memory": MEMORY_METHOD,
        "baseline": (
            "torch SDPA as a user would call it: no mask (dense), is_causal (plain causal), "
            "else the dense bool mask (+ bias as float mask); softmax only"
        ),
    }


ProgressFn = Callable[[int, int, str], None]


def run_speed_bench(
    config: SpeedConfig,
    progress: ProgressFn | None = None,
    cell_done: Callable[[list[Record]], None] | None = None,
) -> SpeedResults:
    """Run the grid of ``config``. ``progress(done, total, label)`` is called before each cell
    and once at the end; ``cell_done(records)`` with each finished cell's records."""
    cells = [
        (m, t, d) for m in config.mechanisms for d in config.dtypes for t in sorted(config.lengths)
    ]
    state = GridState()
    records: list[Record] = []
    for i, (name, T, dtype) in enumerate(cells):
        if progress is not None:
            progress(i, len(cells), f"{name} T={T} {dtype}")
        cell = run_cell(catalog.get(name), T, dtype, config, state)
        records += cell
        if cell_done is not None:
            cell_done(cell)
        # Every cell is a new shape/mask/score for compiled backends: dropping the previous
        # cells' compiled variants keeps guard checks short and recompile limits unreached.
        torch.compiler.reset()
        release_memory()
    if progress is not None:
        progress(len(cells), len(cells), "done")
    return SpeedResults(describe_config(config), records)
