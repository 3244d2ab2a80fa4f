"""Calibration: the cost table of the device that runs, measured on it.

``auto`` ranks backends by estimated cost (``attnkit.costs``). The estimates that depend on the
machine (how fast each backend's GEMMs and kernels run relative to SDPA, per dtype and grad
mode) are measured here, once per machine and device, torch and attnkit version and thread
count, and cached as JSON under the user cache dir (``$ATTNKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/attnkit``, else ``~/.cache/attnkit``). ``attnkit calibrate`` runs it and prints
the table; the first ``auto`` call that needs a table runs it otherwise.

What is measured, at ``B=1, H=4, T=2048, D=64`` (``SHAPE``), for float32 and bfloat16 (CUDA:
float16 too), without and with gradients: dense SDPA (the unit), SDPA ``is_causal``, SDPA
with a dense boolean mask and with a float mask (how a bias reaches it), chunked and
blocksparse without a mask and causal, FlexAttention with a causal mask (forward only on the
CPU; it compiles once per dtype, score and bias), and chunked, Flex and blocksparse causal with
the sigmoid score and with an ALiBi bias against plain softmax (what a score function or a bias
adds; blocksparse also with softplus-l1, whose weights cost its kernel more than sigmoid's);
then chunked and Flex causal again at T/2, which separates their fixed cost per call from
their cost per pair. Each ratio is the median over rounds of the candidate's time over dense
SDPA's in the same round. Paths that are no candidate here (a bfloat16 kernel on a CPU that
emulates bfloat16 matmuls) are not measured.

``ATTNKIT_CALIBRATION=off`` skips all of it: ``auto`` then uses the conservative table
(``attnkit.costs.conservative_table``), which never prefers another backend over SDPA for
dense or causal attention. Tests give ``auto`` a table of their own with :func:`using`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from attnkit.backends import blocksparse, chunked, flex, sdpa
from attnkit.backends.base import Backend
from attnkit.call import AttentionCall
from attnkit.costs import CostTable, Key, conservative_table, dtype_name
from attnkit.machine import Capabilities, capabilities
from attnkit.masks.patterns import causal, sliding_window
from attnkit.positional.alibi import alibi
from attnkit.scores import sigmoid, softplus_l1
from attnkit.version import __version__

_log = logging.getLogger("attnkit")

#: Bump when what is measured, or how, changes: cached tables of another format are remeasured.
FORMAT = 11


@dataclasses.dataclass(frozen=True)
class Shape:
    """The calibration problem: ``q, k, v [B, T, H, D]``, and a shorter length that separates
    fixed costs from costs per pair."""

    B: int = 1
    T: int = 2048
    H: int = 4
    D: int = 64

    @property
    def short_T(self) -> int:
        return max(self.T // 2, 1)


SHAPE = Shape()
#: Timed rounds per measurement (after one untimed call).
ROUNDS = 5
#: A step this many times slower than dense SDPA in the first round is timed only once (a
#: path that far behind needs no median to be ranked).
FAR_BEHIND = 3.0


def enabled() -> bool:
    """False when ``ATTNKIT_CALIBRATION=off`` (or 0/false/no)."""
    return os.environ.get("ATTNKIT_CALIBRATION", "on").lower() not in ("off", "0", "false", "no")


def cache_dir() -> Path:
    if "ATTNKIT_CACHE_DIR" in os.environ:
        return Path(os.environ["ATTNKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnkit"


def _sources_digest() -> str:
    """The compiled kernels' sources: a changed kernel is a changed machine for the table."""
    digest = hashlib.sha256()
    for path in sorted((Path(blocksparse.__file__).parent / "csrc").glob("*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cache_path(device: torch.device) -> Path:
    """Where the table of ``device`` in this configuration is cached."""
    caps = capabilities(device)
    identity = json.dumps(
        [FORMAT, caps.describe(), torch.__version__, __version__,
         torch.get_num_threads(), os.environ.get("ATTNKIT_NATIVE", "1"), _sources_digest(),
         dataclasses.astuple(SHAPE)]
    )  # fmt: skip
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / f"calibration-{caps.device}-{key}.json"


# -- measuring -----------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(
    backend: Backend, call: AttentionCall, grad_out: torch.Tensor | None
) -> Callable[[], None]:
    """One forward (and backward, with ``grad_out``) of ``backend`` on ``call``."""

    def run() -> None:
        out, _ = backend.run(call)
        if grad_out is not None:
            out.backward(grad_out)

    return run


def _paired_ratios(
    steps: dict[str, Callable[[], None]], device: torch.device, rounds: int
) -> dict[str, float]:
    """Median over rounds of each step's time over the ``"unit"`` step's in the same round. A
    step whose first call fails is left out (its entry falls back to ``FACTORS``) and logged:
    measuring must never break the attention call that asked for the table."""
    for name, step in list(steps.items()):  # first calls: compilation, caches, kernel builds
        try:
            step()
        except Exception as error:
            if name == "unit":
                raise
            _log.warning(
                "attnkit: calibration left out %s: %s: %s", name, type(error).__name__, error
            )
            del steps[name]
    times: dict[str, list[float]] = {name: [] for name in steps}
    timed = dict(steps)
    for round_ in range(rounds):
        for name, step in timed.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
        if round_ == 0:  # far behind SDPA (emulated matmuls): its ranking needs no median
            unit_s = times["unit"][0]
            timed = {n: s for n, s in timed.items() if times[n][0] <= FAR_BEHIND * unit_s}
    unit = times["unit"]
    ratios = {
        name: statistics.median(t / u for t, u in zip(ts, unit, strict=False))
        for name, ts in times.items()
        if name != "unit"
    }
    # The fastest call of each step: noise only adds time, so fits of small differences
    # (fixed costs) read these.
    ratios.update({f"{name}.fastest_s": min(ts) for name, ts in times.items()})
    return ratios


def _inputs(shape: Shape, T: int, dtype: torch.dtype, device: torch.device, grad: bool):
    """Seeded ``q, k, v [B, T, H, D]`` and an upstream gradient (None without ``grad``)."""
    g = torch.Generator(device="cpu").manual_seed(T)
    q, k, v = (
        torch.randn(shape.B, T, shape.H, shape.D, generator=g).to(device, dtype) for _ in range(3)
    )
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, torch.randn_like(q.detach()) if grad else None


def _fixed_and_per_pair(
    times: tuple[float, float], live: tuple[float, float], unit: float, pairs: tuple[int, int]
) -> tuple[float, float]:
    """Fit ``time = fixed + per_pair · live pairs`` to a backend's fastest seconds at a long and
    a short shape (``live``: their live fractions; ``unit``: dense SDPA's fastest seconds at the
    long shape; ``pairs``: all pairs of each). Returns ``per_live`` in dense-SDPA units and
    ``fixed`` as dense-SDPA pairs, at the long shape's SDPA speed."""
    live_pairs = (live[0] * pairs[0], live[1] * pairs[1])
    per_pair = (times[0] - times[1]) / (live_pairs[0] - live_pairs[1])
    if per_pair <= 0:  # noise larger than the difference: all of it per pair
        per_pair = times[0] / live_pairs[0]
    fixed = max(times[0] - per_pair * live_pairs[0], 0.0)
    sdpa_per_pair = unit / pairs[0]
    return per_pair / sdpa_per_pair, fixed / sdpa_per_pair


def _measure(
    device: torch.device, dtype: torch.dtype, grad: bool, table: CostTable,
    shape: Shape, rounds: int,
) -> dict[Key, float]:  # fmt: skip
    """The measured entries of one dtype and grad mode (run in that grad mode: the calls'
    ``needs_grad``, and so the backends' ``supports``, read it)."""
    q, k, v, grad_out = _inputs(shape, shape.T, dtype, device, grad)
    dense = AttentionCall(q, k, v)
    masked = AttentionCall(q, k, v, mask=causal())
    # a score function other than softmax, and an additive bias
    scored = AttentionCall(q, k, v, mask=causal(), score=sigmoid())
    biased = AttentionCall(q, k, v, mask=causal(), bias=alibi(shape.H))
    softplus = AttentionCall(q, k, v, mask=causal(), score=softplus_l1())
    # the causal pattern as a window over every key: not `is_causal`, so SDPA takes a matrix
    as_matrix = AttentionCall(q, k, v, mask=sliding_window(shape.T))
    steps = {
        "unit": _step(sdpa.BACKEND, dense, grad_out),
        # bias and mask as one float matrix, built by the first (untimed) call and cached
        "sdpa.bias": _step(sdpa.BACKEND, biased, grad_out),
        "sdpa.causal": _step(sdpa.BACKEND, masked, grad_out),
        "sdpa.mask": _step(sdpa.BACKEND, as_matrix, grad_out),
        "chunked.dense": _step(chunked.BACKEND, dense, grad_out),
        "chunked.causal": _step(chunked.BACKEND, masked, grad_out),
        "chunked.sigmoid": _step(chunked.BACKEND, scored, grad_out),
        "chunked.alibi": _step(chunked.BACKEND, biased, grad_out),
    }
    if not math.isinf(blocksparse.BACKEND.cost(dense, table)[0]):  # a candidate here
        steps["blocksparse.dense"] = _step(blocksparse.BACKEND, dense, grad_out)
        for step, call in (("causal", masked), ("sigmoid", scored), ("alibi", biased),
                           ("softplus_l1", softplus)):  # fmt: skip
            if blocksparse.BACKEND.supports(call) is None:
                steps[f"blocksparse.{step}"] = _step(blocksparse.BACKEND, call, grad_out)
    if flex.BACKEND.supports(masked) is None:
        steps["flex.causal"] = _step(flex.BACKEND, masked, grad_out)
    if flex.BACKEND.supports(scored) is None:
        steps["flex.sigmoid"] = _step(flex.BACKEND, scored, grad_out)
    if flex.BACKEND.supports(biased) is None:
        steps["flex.alibi"] = _step(flex.BACKEND, biased, grad_out)
    ratios = _paired_ratios(steps, device, rounds)
    # Chunked and Flex again at half the length: their fixed costs per call (Python loops,
    # guards, kernel launch) apart from their cost per pair. (A quarter of the length would
    # separate them better, but per-pair costs are not yet constant there: Flex's tiles and
    # chunked's pieces run less efficiently at short lengths, and the fit would charge that
    # to a fixed cost and extrapolate long calls too cheap.)
    short_T = shape.short_T
    sq, sk, sv, short_grad = _inputs(shape, short_T, dtype, device, grad)
    short_causal = AttentionCall(sq, sk, sv, mask=causal())
    short_steps = {
        "unit": _step(sdpa.BACKEND, AttentionCall(sq, sk, sv), short_grad),
        "chunked.causal": _step(chunked.BACKEND, short_causal, short_grad),
    }
    if "flex.causal" in ratios:
        short_steps["flex.causal"] = _step(flex.BACKEND, short_causal, short_grad)
    # The fixed cost is a difference of two measurements: the short runs, 4x cheaper, take
    # more rounds so that its noise stays small.
    short = _paired_ratios(short_steps, device, 3 * rounds)

    name = dtype_name(dtype)
    pairs = shape.B * shape.H * shape.T * shape.T
    entries: dict[Key, float] = {}
    if "sdpa.causal" in ratios:
        entries["sdpa.causal_edge", name, grad] = max(0.0, (ratios["sdpa.causal"] - 0.5) * shape.T)
    for entry in ("sdpa.mask", "sdpa.bias", "chunked.dense"):
        if entry in ratios:
            entries[entry, name, grad] = ratios[entry]
    tile_shapes = {
        "chunked": (chunked.BLOCK_Q, chunked.BLOCK_K),
        "flex": (flex.BLOCK_SIZE, flex.BLOCK_SIZE),
    }
    for backend, tile in tile_shapes.items():
        key = f"{backend}.causal"
        for entry, step in (("score", "sigmoid"), ("bias", "alibi")):
            if key in ratios and f"{backend}.{step}" in ratios:
                entries[f"{backend}.{entry}", name, grad] = (
                    ratios[f"{backend}.{step}"] / ratios[key]
                )
        if key in ratios and key in short:
            live = tuple(
                causal().blocks(T, T, *tile, device).live_fraction() for T in (shape.T, short_T)
            )
            fastest = (ratios[f"{key}.fastest_s"], short[f"{key}.fastest_s"])
            all_pairs = (pairs, shape.B * shape.H * short_T**2)
            per_live, fixed = _fixed_and_per_pair(
                fastest, live, ratios["unit.fastest_s"], all_pairs
            )
            entries[f"{backend}.per_live", name, grad] = per_live
            entries[f"{backend}.overhead_pairs", name, grad] = fixed
    if "blocksparse.dense" in ratios:
        overhead = table.value("blocksparse.overhead_pairs", dtype, grad) / pairs
        per_live = max(ratios["blocksparse.dense"] - overhead, 1e-3)
        entries["blocksparse.per_live", name, grad] = per_live
    for entry, step in (
        ("blocksparse.score.sigmoid", "sigmoid"),
        ("blocksparse.score.softplus_l1", "softplus_l1"),
        ("blocksparse.bias", "alibi"),
    ):
        if "blocksparse.causal" in ratios and f"blocksparse.{step}" in ratios:
            ratio = ratios[f"blocksparse.{step}"] / ratios["blocksparse.causal"]
            entries[entry, name, grad] = ratio
    return entries


def calibration_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    if device.type == "cuda":
        return (torch.float32, torch.bfloat16, torch.float16)
    return (torch.float32, torch.bfloat16)


def measure(
    device: torch.device | str = "cpu", shape: Shape | None = None, rounds: int | None = None
) -> CostTable:
    """Measure the cost table of ``device`` now (no cache), at ``shape`` (default ``SHAPE``)
    with ``rounds`` timed rounds (default ``ROUNDS``)."""
    device = torch.device(device)
    shape = SHAPE if shape is None else shape
    rounds = ROUNDS if rounds is None else rounds
    caps = capabilities(device)
    start = time.perf_counter()
    base = CostTable(caps, "defaults")
    entries: dict[Key, float] = {}
    for dtype in calibration_dtypes(device):
        for grad in (False, True):
            with torch.enable_grad() if grad else torch.no_grad():
                entries.update(_measure(device, dtype, grad, base, shape, rounds))
    took = time.perf_counter() - start
    when = datetime.datetime.now().isoformat(timespec="seconds")
    source = (
        f"measured {when} in {took:.1f} s (B={shape.B} H={shape.H} T={shape.T} D={shape.D}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    return CostTable(caps, source, entries)


def _to_json(table: CostTable) -> dict:
    rows = [{"name": n, "dtype": d, "grad": g, "value": v} for n, d, g, v in table.rows()]
    return {"format": FORMAT, "device": table.capabilities.describe(), "source": table.source,
            "entries": rows}  # fmt: skip


def _from_json(data: dict, caps: Capabilities) -> CostTable:
    entries = {(r["name"], r["dtype"], r["grad"]): float(r["value"]) for r in data["entries"]}
    return CostTable(caps, data["source"], entries)


def calibrate(device: torch.device | str = "cpu", force: bool = False) -> CostTable:
    """The measured table of ``device``: from the cache, or measured now and cached."""
    device = torch.device(device)
    path = cache_path(device)
    if not force and path.exists():
        try:
            return _from_json(json.loads(path.read_text()), capabilities(device))
        except (ValueError, KeyError, TypeError):
            _log.warning("attnkit: unreadable calibration cache %s; measuring again", path)
    _log.warning(
        "attnkit: measuring the backends on %s for backend='auto' (once per machine, cached in "
        "%s; `attnkit calibrate` does it ahead, ATTNKIT_CALIBRATION=off skips it)",
        device,
        path.parent,
    )
    table = measure(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(_to_json(table), indent=1))
    temporary.replace(path)
    return table


# -- the table auto uses -------------------------------------------------------------------

_given: contextvars.ContextVar[CostTable | None] = contextvars.ContextVar("given", default=None)
_tables: dict[str, CostTable] = {}
_measuring: contextvars.ContextVar[bool] = contextvars.ContextVar("measuring", default=False)


@contextlib.contextmanager
def using(table: CostTable) -> Iterator[CostTable]:
    """``auto`` ranks by ``table`` inside the block, whatever the device (tests, what-ifs)."""
    token = _given.set(table)
    try:
        yield table
    finally:
        _given.reset(token)


def table_for(device: torch.device | str) -> CostTable:
    """The table ``auto`` ranks by on ``device``: a given one (:func:`using`), the conservative
    one with ``ATTNKIT_CALIBRATION=off``, else the measured one (measured on first use)."""
    given = _given.get()
    if given is not None:
        return given
    device = torch.device(device)
    caps = capabilities(device)
    if not enabled() or _measuring.get():
        return conservative_table(caps)
    key = f"{device.type}:{device.index or 0}"
    if key not in _tables:
        token = _measuring.set(True)
        try:
            _tables[key] = calibrate(device)
        finally:
            _measuring.reset(token)
    return _tables[key]


def forget() -> None:
    """Drop the tables of this process (the disk cache stays)."""
    _tables.clear()
