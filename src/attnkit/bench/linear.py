"""The linear/recurrent benchmark: chunked forms against SDPA causal, from 1k to 64k.

For every (mechanism, T, dtype) cell, on the same ``q, k, v [B, T, H, D]``:

- **ours**: the mechanism's chunked form (``attnkit.linear.MECHANISMS[name].run``), and its
  recurrent form where that runs on the compiled kernel (role ``recurrent``: token by token with
  the state in cache, fewer flops per token than chunks; otherwise the recurrent form is a
  PyTorch loop meant for decoding and is not timed for prefill);
- **baseline**: ``F.scaled_dot_product_attention(..., is_causal=True)``, as a user would call it;
- **peers**: flash-linear-attention's pure-PyTorch reference functions (``fla.ops.*.naive``),
  where the ``fla`` package is importable (its Triton kernels need a GPU; the naive functions
  run anywhere). Each peer is checked against our output at ``verify_T`` first.

Each candidate gets one first call, one call with sampled peak memory
(``attnkit.bench.measure.peak_rss_increase_mb``), then ``repeats`` interleaved rounds (every
candidate once per round, order rotating); a candidate whose single call exceeds
``slow_call_s`` is timed by its memory-sampled call alone. Medians are reported; ``ratio =
sdpa_ms / ms`` (> 1: faster than SDPA causal), only for configurations whose correctness check
passed (each of our forms vs the quadratic reference under the 2x rule at ``verify_T``).

Decoding: after a prefill of ``T`` tokens, the time per generated token of the recurrent form
(carrying the state) against SDPA with one query over a ``T``-key cache.

Derived: per (mechanism, dtype) the crossing point (smallest length from which the chunked form
stays faster than SDPA, interpolated on log-log axes between grid lengths), the ratio at 32k,
and the log-log slope of time against ``T`` (about 1 for a linear form, about 2 for SDPA), the
ratio at 32k of the recurrent kernel, and the speed-up over the peer at 8k of the faster of our
forms (``peer_compared_form``).
"""

from __future__ import annotations

import datetime
import functools
import importlib
import importlib.util
import math
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit import linear
from attnkit.backends import native
from attnkit.bench.measure import median, peak_rss_increase_mb, release_memory, timed
from attnkit.bench.speed import DTYPES
from attnkit.linear.based import based_problem
from attnkit.linear.decay import lightning_decay, retnet_decay
from attnkit.testing import check_function
from attnkit.version import __version__

#: Causal mechanisms with a chunked form, timed by default.
DEFAULT_MECHANISMS = (
    "linear_attention",
    "lightning_attention",
    "retention",
    "gla",
    "based",
    "aaren",
    "rat",
    "flare_causal",
)


@dataclass(frozen=True)
class LinearBenchConfig:
    """The grid: mechanisms x lengths x dtypes at ``B``, ``H`` query heads, ``Hkv`` key/value
    heads (None: ``H``, MHA; fewer: GQA, against SDPA with ``enable_gqa``), head dim ``D``.

    ``sdpa_max_T`` caps the quadratic baseline (None: every length; at 64k one fp32 SDPA causal
    call takes tens of seconds on the project's 2-core CPU). Peers whose naive form is a
    token-by-token Python loop are timed up to ``recurrent_peer_max_T``.
    """

    mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    B: int = 1
    H: int = 4
    Hkv: int | None = None
    D: int = 64
    chunk_size: int = 64
    repeats: int = 3
    slow_call_s: float = 2.0
    decode_steps: int = 16
    decode: bool = True
    peers: bool = True
    sdpa_max_T: int | None = None
    recurrent_peer_max_T: int = 8192
    verify_T: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in self.mechanisms:
            mechanism = linear.get(name)
            if not mechanism.causal or "chunked" not in mechanism.forms:
                raise ValueError(f"{name!r} is not a causal mechanism with a chunked form")
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
        if self.H % self.kv_heads:
            raise ValueError(f"H={self.H} query heads need Hkv dividing them, got {self.Hkv}")
        one_head = [n for n in self.mechanisms if not linear.get(n).gqa]
        if self.kv_heads != self.H and one_head:
            raise ValueError(
                f"{', '.join(one_head)} need one key head per query head (their keys query the "
                f"latents): leave them out of --mechanisms for a GQA run (Hkv={self.Hkv})"
            )

    @property
    def kv_heads(self) -> int:
        return self.H if self.Hkv is None else self.Hkv


def quick_linear_config(**overrides: Any) -> LinearBenchConfig:
    """A grid of seconds (T = 256, 512; fp32; two mechanisms) to test the benchmark itself."""
    options: dict[str, Any] = dict(
        mechanisms=("linear_attention", "gla"),
        lengths=(256, 512),
        dtypes=("float32",),
        H=2,
        D=32,
        repeats=1,
        decode_steps=2,
        verify_T=64,
    )
    return LinearBenchConfig(**(options | overrides))


@dataclass
class LinearRecord:
    """One timed candidate. ``phase``: ``prefill`` or ``decode`` (``median_ms`` per token);
    ``role``: ``ours`` (the chunked form), ``recurrent`` (the recurrent kernel), ``baseline``,
    ``peer`` or ``matching`` (our computation of a peer's function that is only part of the
    mechanism); ``status``: ``ok``, ``skipped``, ``error``."""

    phase: str
    mechanism: str
    T: int
    dtype: str
    candidate: str
    role: str
    status: str = "ok"
    reason: str | None = None
    median_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    ratio: float | None = None
    verified: bool | None = None
    check: str | None = None


@dataclass
class LinearBenchResults:
    config: dict[str, Any]
    records: list[LinearRecord]
    summary: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "records": [asdict(r) for r in self.records],
            "summary": self.summary,
        }


# -- inputs and candidates -------------------------------------------------------------------


def _inputs(config: LinearBenchConfig, T: int, dtype: torch.dtype) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(config.seed + T)
    heads = {"q": config.H, "k": config.kv_heads, "v": config.kv_heads}
    return {
        name: (torch.randn(config.B, T, h, config.D, generator=g) * 0.5).to(dtype)
        for name, h in heads.items()
    }


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        enable_gqa=q.shape[2] != k.shape[2],
    ).transpose(1, 2)


def _sdpa_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _sdpa(q, k, v, causal=True)


def _sdpa_decode(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # One query over the whole cache: no mask needed.
    return _sdpa(q, k, v, causal=False)


@dataclass(frozen=True)
class Peer:
    """A flash-linear-attention naive function adapted to our inputs.

    ``prepare(mechanism inputs) -> args`` maps our (extras-filled) inputs to its arguments;
    ``call(fla_module, args) -> [B, T, H, Dv]``; ``max_T`` caps token-by-token loops.
    """

    name: str
    module: str
    call: Callable[[Any, dict[str, Any]], Tensor]
    recurrent: bool = False
    note: str = ""
    #: ``ours(inputs, form)``: our computation of the peer's function where it is not the whole
    #: mechanism (BASED's peer is its Taylor half), timed as its own rows (role ``matching``)
    #: so that the peer is compared with the same function.
    ours: Callable[[dict[str, Any], str], Tensor] | None = None
    #: what ``ours`` computes, for its rows' candidate names
    ours_label: str = ""


def _elu1(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


def _fla_linear(mod: Any, x: dict[str, Any]) -> Tensor:
    # fla's chunked form takes the feature-mapped q, k; with normalize the scale cancels.
    return mod.naive_chunk_linear_attn(_elu1(x["q"]), _elu1(x["k"]), x["v"], 1.0, True)


def _fla_simple_gla(decay_fn: Callable[[int], Tensor], scale: Callable[[int], float]):
    def call(mod: Any, x: dict[str, Any]) -> Tensor:
        B, T, H, D = x["k"].shape
        g = torch.log(decay_fn(H)).to(torch.float32).view(1, 1, H).expand(B, T, H).contiguous()
        out, _ = mod.naive_chunk_simple_gla(x["q"], x["k"], x["v"], g, scale=scale(D))
        return out

    return call


def _fla_gla(mod: Any, x: dict[str, Any]) -> Tensor:
    out, _ = mod.naive_recurrent_gla(x["q"], x["k"], x["v"], x["log_gate"])
    return out


def _fla_based(mod: Any, x: dict[str, Any]) -> Tensor:
    tr = [t.transpose(1, 2) for t in (x["feature_q"], x["feature_k"], x["v"])]
    return mod.naive_chunk_based(*tr, chunk_size=64).transpose(1, 2)


def _based_linear_half(x: dict[str, Any], form: str) -> Tensor:
    return linear.solve(based_problem(x["feature_q"], x["feature_k"], x["v"]), form=form)


#: Peers by our mechanism name.
PEERS: dict[str, Peer] = {
    "linear_attention": Peer(
        "fla naive_chunk_linear_attn", "fla.ops.linear_attn.naive", _fla_linear
    ),
    "lightning_attention": Peer(
        "fla naive_chunk_simple_gla",
        "fla.ops.simple_gla.naive",
        _fla_simple_gla(lightning_decay, lambda D: 1.0),
    ),
    "retention": Peer(
        "fla naive_chunk_simple_gla",
        "fla.ops.simple_gla.naive",
        _fla_simple_gla(retnet_decay, lambda D: D**-0.5),
    ),
    "gla": Peer("fla naive_recurrent_gla", "fla.ops.gla.naive", _fla_gla, recurrent=True),
    "based": Peer(
        "fla naive_chunk_based",
        "fla.ops.based.naive",
        _fla_based,
        note="Taylor linear half only (no window); T must be a multiple of 64",
        ours=_based_linear_half,
        ours_label="Taylor half",
    ),
}


def _load_peer(peer: Peer) -> tuple[Any | None, str | None]:
    """The peer's module, or the reason it cannot run here."""
    if importlib.util.find_spec("fla") is None:
        return None, "flash-linear-attention (fla) is not installed"
    try:
        return importlib.import_module(peer.module), None
    except Exception as error:  # an optional peer failing to import must not stop the run
        return None, f"import {peer.module} failed: {type(error).__name__}: {error}"


# -- measuring -------------------------------------------------------------------------------


@dataclass
class _Timed:
    record: LinearRecord
    step: Callable[[], object]
    estimate_s: float = 0.0


def _time_cell(candidates: list[_Timed], config: LinearBenchConfig) -> None:
    """First call, memory-sampled call, then interleaved rounds (``attnkit.bench`` rules)."""
    live = []
    for c in candidates:
        try:
            with torch.no_grad():
                first = timed(c.step)
                c.record.peak_mb, memory_s = peak_rss_increase_mb(c.step)
        except Exception as error:  # one failing candidate must not stop the benchmark
            c.record.status, c.record.reason = "error", f"{type(error).__name__}: {error}"
            continue
        c.estimate_s = min(first, memory_s)
        if c.estimate_s > config.slow_call_s:
            c.record.times_ms.append(memory_s * 1e3)
        else:
            live.append(c)
    release_memory()
    with torch.no_grad():
        for i in range(config.repeats):
            shift = i % max(1, len(live))
            for c in live[shift:] + live[:shift]:
                c.record.times_ms.append(timed(c.step) * 1e3)
    for c in candidates:
        if c.record.times_ms:
            c.record.median_ms = median(c.record.times_ms)


def _verify(
    mechanism: linear.LinearMechanism,
    config: LinearBenchConfig,
    dtype: torch.dtype,
    form: str = "chunked",
) -> tuple[bool, str]:
    """``form`` vs the quadratic reference (forward, 2x rule) at ``verify_T``."""
    everything = mechanism.inputs(**_inputs(config, config.verify_T, dtype))
    tensors = {n: t for n, t in everything.items() if isinstance(t, Tensor)}
    options = {n: t for n, t in everything.items() if not isinstance(t, Tensor)}
    chunking = _chunk_options(mechanism, config) if form == "chunked" else {}

    def chunked(**y: Tensor) -> Tensor:
        return mechanism.form(form)(**y, **options, **chunking)

    def reference(**y: Tensor) -> Tensor:
        return mechanism.reference(**y, **options)

    try:
        report = check_function(chunked, reference, tensors, grads=False)
    except Exception as error:  # a crash in the check is a failed check, not a crashed run
        return False, f"FAILED: the check raised {type(error).__name__}: {error}"
    worst = max(report.comparisons, key=lambda c: c.error / c.bound)
    verdict = "passed" if report.ok else "FAILED"
    return report.ok, (
        f"{verdict} at T={config.verify_T}: error {worst.error:.2e}, bound {worst.bound:.2e}"
    )


def _peer_check(peer_out: Tensor, ours: Tensor) -> tuple[bool, str]:
    err = (peer_out.double() - ours.double()).abs().max().item()
    scale = max(1.0, ours.double().abs().max().item())
    tol = 1e-2 if ours.dtype == torch.bfloat16 else 1e-4
    ok = err <= tol * scale
    return ok, f"{'matches' if ok else 'DIFFERS FROM'} ours: max |diff| {err:.2e}"


def _chunk_options(mechanism: linear.LinearMechanism, config: LinearBenchConfig) -> dict:
    # RAT's chunk is part of the model (16 tokens); the others take the execution chunk.
    return {} if mechanism.name == "rat" else {"chunk_size": config.chunk_size}


def _peer_candidates(
    peer: Peer,
    module: Any,
    mechanism: linear.LinearMechanism,
    inputs: dict[str, Any],
    record: Callable[..., LinearRecord],
    config: LinearBenchConfig,
) -> list[_Timed]:
    """The peer, checked first against our output on ``verify_T`` tokens; where the peer's
    function is only part of the mechanism (``Peer.ours``), also our rows for that part in each
    of our fast forms (the recurrent one where the compiled kernel runs it), each checked
    against the same peer output."""
    small = mechanism.inputs(**_inputs(config, config.verify_T, inputs["k"].dtype))

    def ours(x: dict[str, Any], form: str = "chunked") -> Tensor:
        if peer.ours is not None:
            return peer.ours(x, form)
        return mechanism.chunked(**x, **_chunk_options(mechanism, config))

    try:
        with torch.no_grad():
            expected = peer.call(module, small)
            ok, check = _peer_check(expected, ours(small))
    except Exception as error:  # a peer that cannot run these inputs is reported, not fatal
        expected, ok, check = None, False, f"FAILED: {type(error).__name__}: {error}"
    entry = record(peer.name, "peer", verified=ok, check=check, reason=peer.note or None)
    timed = [_Timed(entry, lambda: peer.call(module, inputs))]
    if peer.ours is None or expected is None:
        return timed
    for form in ["chunked"] if native.load("linear_cpu") is None else ["chunked", "recurrent"]:
        if form != "chunked":  # the chunked form's check is the peer's own, above
            with torch.no_grad():
                ok, check = _peer_check(expected, ours(small, form))
        entry = record(f"{peer.ours_label}, {form}", "matching", verified=ok, check=check)
        timed.append(_Timed(entry, functools.partial(peer.ours, inputs, form)))
    return timed


def _prefill_cell(
    name: str, T: int, dtype_name: str, config: LinearBenchConfig, verified: dict
) -> list[LinearRecord]:
    dtype = DTYPES[dtype_name]
    mechanism = linear.get(name)
    x = _inputs(config, T, dtype)
    inputs = mechanism.inputs(**x)
    options = _chunk_options(mechanism, config)

    def record(candidate: str, role: str, **extra: Any) -> LinearRecord:
        return LinearRecord("prefill", name, T, dtype_name, candidate, role, **extra)

    key = (name, dtype_name)
    if key not in verified:
        verified[key] = _verify(mechanism, config, dtype)
    ours = _Timed(
        record("chunked", "ours", verified=verified[key][0], check=verified[key][1]),
        lambda: mechanism.chunked(**inputs, **options),
    )
    candidates = [ours]
    if mechanism.fastest_form(inputs) == "recurrent":
        key = (name, dtype_name, "recurrent")
        if key not in verified:
            verified[key] = _verify(mechanism, config, dtype, "recurrent")
        entry = record("recurrent", "recurrent", verified=verified[key][0], check=verified[key][1])
        candidates.append(_Timed(entry, lambda: mechanism.recurrent(**inputs)))
    skipped: list[LinearRecord] = []
    if config.sdpa_max_T is None or config.sdpa_max_T >= T:
        candidates.append(_Timed(record("sdpa causal", "baseline"), lambda: _sdpa_causal(**x)))
    else:
        skipped.append(
            record(
                "sdpa causal",
                "baseline",
                status="skipped",
                reason=f"T > sdpa_max_T={config.sdpa_max_T}",
            )
        )
    peer = PEERS.get(name) if config.peers else None
    if peer is not None:
        module, reason = _load_peer(peer)
        if config.kv_heads != config.H:
            reason = "fla's naive functions take as many key/value heads as query heads"
        if reason is None and peer.recurrent and config.recurrent_peer_max_T < T:
            reason = f"token-by-token loop: timed up to T={config.recurrent_peer_max_T}"
        if reason is not None:
            skipped.append(record(peer.name, "peer", status="skipped", reason=reason))
        else:
            candidates += _peer_candidates(peer, module, mechanism, inputs, record, config)
    _time_cell(candidates, config)
    base = next((c.record for c in candidates if c.record.role == "baseline"), None)
    for c in candidates:
        r = c.record
        if base is not None and base.median_ms and r.median_ms and r.verified is not False:
            r.ratio = base.median_ms / r.median_ms
    return [c.record for c in candidates] + skipped


#: Inputs that carry one entry per token (sliced for decoding); Aaren's query and FLARE's
#: latents are not among them.
PER_TOKEN = (
    "q",
    "k",
    "v",
    "log_gate",
    "backward_log_gate",
    "gate",
    "value_gate",
    "feature_q",
    "feature_k",
)


def _decode_cell(
    name: str, T: int, dtype_name: str, config: LinearBenchConfig
) -> list[LinearRecord]:
    """Per-token decode time after a ``T``-token prefill: recurrent form vs SDPA over a cache."""
    dtype = DTYPES[dtype_name]
    mechanism = linear.get(name)
    steps = config.decode_steps
    x = _inputs(config, T + steps, dtype)
    inputs = mechanism.inputs(**x)
    per_token = {
        n: t
        for n, t in inputs.items()
        if n in PER_TOKEN and isinstance(t, Tensor) and t.shape[1] == T + steps
    }
    prompt = inputs | {n: t[:, :T] for n, t in per_token.items()}
    with torch.no_grad():
        _, state = mechanism.chunked(
            **prompt, **_chunk_options(mechanism, config), return_state=True
        )
    new = [
        inputs | {n: t[:, T + i : T + i + 1] for n, t in per_token.items()} for i in range(steps)
    ]

    def ours() -> object:
        s = state
        for step in new:
            _, s = mechanism.recurrent(**step, initial_state=s, return_state=True)
        return s

    cache = {n: x[n][:, : T + 1] for n in ("k", "v")}
    query = x["q"][:, T : T + 1]

    def sdpa() -> object:
        for _ in range(steps):
            _sdpa_decode(query, **cache)
        return None

    candidates = [
        _Timed(LinearRecord("decode", name, T, dtype_name, "recurrent", "ours"), ours),
        _Timed(LinearRecord("decode", name, T, dtype_name, "sdpa over KV cache", "baseline"), sdpa),
    ]
    _time_cell(candidates, config)
    for c in candidates:
        if c.record.median_ms is not None:
            c.record.times_ms = [t / steps for t in c.record.times_ms]
            c.record.median_ms /= steps
    base, mine = candidates[1].record, candidates[0].record
    if base.median_ms and mine.median_ms:
        mine.ratio = base.median_ms / mine.median_ms
        base.ratio = 1.0
    return [c.record for c in candidates]


# -- derived numbers -------------------------------------------------------------------------


def loglog_slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of ``log(ms)`` against ``log(T)``."""
    if len(points) < 2:
        return None
    xs = [math.log(t) for t, _ in points]
    ys = [math.log(ms) for _, ms in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else None


def crossing_point(ratios: list[tuple[int, float]]) -> float | None:
    """Smallest length from which ``ratio >= 1`` holds at every larger grid length,
    interpolated linearly in ``log T`` and ``log ratio`` from the grid point before it."""
    ordered = sorted(ratios)
    for i, (T, ratio) in enumerate(ordered):
        if all(r >= 1.0 for _, r in ordered[i:]):
            if i == 0 or ratio == 1.0:
                return float(T)
            T0, r0 = ordered[i - 1]
            frac = -math.log(r0) / (math.log(ratio) - math.log(r0))
            return math.exp(math.log(T0) + frac * (math.log(T) - math.log(T0)))
    return None


#: Roles of our own forms in the records: the chunked form, the recurrent kernel.
OUR_ROLES = ("ours", "recurrent")


def summarize(records: list[LinearRecord]) -> list[dict[str, Any]]:
    """Per (mechanism, dtype): crossing point, ratio at 32k, slopes, decode flatness."""
    rows = []
    keys = sorted({(r.mechanism, r.dtype) for r in records})
    for name, dtype in keys:
        mine = [r for r in records if (r.mechanism, r.dtype) == (name, dtype) and r.median_ms]
        prefill = [r for r in mine if r.phase == "prefill"]
        ours = [(r.T, r.ratio) for r in prefill if r.role == "ours" and r.ratio]
        at_32k = next((ratio for T, ratio in ours if T == 32768), None)

        def slope(role: str, phase: str = "prefill", rows_: list = mine) -> float | None:
            pts = [(r.T, r.median_ms) for r in rows_ if r.role == role and r.phase == phase]
            return loglog_slope(pts)

        decode = sorted(
            (r.T, r.median_ms) for r in mine if r.phase == "decode" and r.role == "ours"
        )
        peers = [r for r in prefill if r.role == "peer"]
        peer_8k = next((r.ratio for r in peers if r.T == 8192 and r.ratio), None)
        # the peer is compared with the same function: its matching rows where it has them
        roles = ("matching",) if any(r.role == "matching" for r in prefill) else OUR_ROLES
        forms_8k = [r for r in prefill if r.T == 8192 and r.role in roles and r.ratio]
        best_8k = max(forms_8k, key=lambda r: r.ratio, default=None)
        recurrent_32k = next(
            (r.ratio for r in prefill if r.role == "recurrent" and r.T == 32768 and r.ratio), None
        )
        rows.append(
            {
                "mechanism": name,
                "dtype": dtype,
                "crossing_T": crossing_point(ours),
                "ratio_at_32k": at_32k,
                "slope_ours": slope("ours"),
                "slope_sdpa": slope("baseline"),
                "recurrent_ratio_at_32k": recurrent_32k,
                "speedup_vs_peer_at_8k": (
                    best_8k.ratio / peer_8k if best_8k is not None and peer_8k else None
                ),
                "peer_compared_form": best_8k.candidate if best_8k is not None else None,
                "decode_ms_per_token": decode,
                "decode_slope": loglog_slope(decode),
            }
        )
    return rows


# -- the run ---------------------------------------------------------------------------------

ProgressFn = Callable[[int, int, str], None]


def run_linear_bench(
    config: LinearBenchConfig, progress: ProgressFn | None = None
) -> LinearBenchResults:
    """Run the prefill grid (and the decode grid) of ``config``; ``progress(done, total,
    label)`` is called before each cell and once at the end."""
    cells = [
        (phase, name, T, dtype)
        for phase in (("prefill", "decode") if config.decode else ("prefill",))
        for name in config.mechanisms
        for dtype in config.dtypes
        for T in sorted(config.lengths)
    ]
    verified: dict = {}
    records: list[LinearRecord] = []
    for i, (phase, name, T, dtype) in enumerate(cells):
        if progress is not None:
            progress(i, len(cells), f"{phase} {name} T={T} {dtype}")
        if phase == "prefill":
            records += _prefill_cell(name, T, dtype, config, verified)
        else:
            records += _decode_cell(name, T, dtype, config)
        release_memory()
    if progress is not None:
        progress(len(cells), len(cells), "done")
    described = asdict(config) | {
        "torch": torch.__version__,
        "attnkit": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "memory": "peak RSS increase of one call, sampled every ~1 ms (a lower bound)",
        "timing": (
            "median over interleaved rounds after one first call and one memory-sampled call; "
            f"a candidate slower than {config.slow_call_s:g} s per call is timed once"
        ),
        "baseline": "torch SDPA is_causal=True (prefill); SDPA, one query over the cache (decode)",
    }
    return LinearBenchResults(described, records, summarize(records))


def plot_linear(results: LinearBenchResults, path: str | Path) -> Path:
    """Time against ``T`` on log-log axes, one panel per dtype (prefill) plus decode per token;
    each line labelled with its fitted slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r.dtype for r in results.records})
    panels = [(f"prefill, {d}", "prefill", d) for d in dtypes]
    if any(r.phase == "decode" for r in results.records):  # none with --no-decode
        panels.append((f"decode, ms per token, {dtypes[0]}", "decode", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, (title, phase, dtype) in zip(axes[0], panels, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in results.records:
            if r.phase != phase or not r.median_ms or (dtype and r.dtype != dtype):
                continue
            if phase == "decode" and r.dtype != dtypes[0]:
                continue
            label = r.candidate if r.role == "baseline" else f"{r.mechanism} ({r.candidate})"
            series.setdefault(label, []).append((r.T, r.median_ms))
        colors = plt.get_cmap("tab20")
        for n, (label, raw) in enumerate(sorted(series.items())):
            # The baseline is timed in every mechanism's cells: one point per T (the median).
            by_T: dict[int, list[float]] = {}
            for T, ms in raw:
                by_T.setdefault(T, []).append(ms)
            pts = sorted((T, median(v)) for T, v in by_T.items())
            slope = loglog_slope(pts)
            baseline = label.startswith("sdpa")
            ax.plot(
                *zip(*pts, strict=True),
                "--" if baseline else ("-." if "fla" in label else "-o"),
                color="black" if baseline else colors(n % 20),
                label=label if slope is None else f"{label}: slope {slope:.2f}",
                markersize=3,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_linear(results: LinearBenchResults, out: str | Path) -> tuple[Path, Path]:
    """Write ``linear.json`` (config, records, summary) and ``linear.png`` into ``out``."""
    import json

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "linear.json"
    data.write_text(json.dumps(results.to_json(), indent=1))
    return data, plot_linear(results, folder / "linear.png")
