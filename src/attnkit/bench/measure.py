"""Measuring one call: wall time and peak memory on a CPU.

Peak memory on a CPU has no allocator counter like ``torch.cuda.max_memory_allocated``, so it is
*sampled*: a background thread reads the process's resident set size (``/proc/self/statm``)
about every millisecond while the call runs, and the result is the peak RSS increase over the
RSS just before the call, after ``gc.collect()`` and glibc's ``malloc_trim(0)`` have returned
freed memory to the system. Short spikes between two samples can be missed, and memory the
allocator reuses without growing RSS is not counted, so it is a lower bound on the true peak.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _load_libc()


def rss_supported() -> bool:
    """True if this platform exposes ``/proc/self/statm`` (Linux)."""
    return os.path.exists(_STATM)


def current_rss_bytes() -> int:
    """Resident set size of this process, in bytes."""
    with open(_STATM) as f:
        return int(f.read().split()[1]) * _PAGE_BYTES


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``)."""
    # Young generations only: tensors die by reference counting, and a full collection
    # walks every object torch ever created (far longer than the calls it would sit between).
    gc.collect(1)
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (its result is dropped before returning)."""
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def peak_rss_increase_mb(
    fn: Callable[[], object], interval_s: float = 0.001
) -> tuple[float | None, float]:
    """``(peak RSS increase in MiB, seconds fn took)`` for one call of ``fn``, RSS sampled
    every ``interval_s`` seconds. The peak is None where RSS cannot be read."""
    if not rss_supported():
        return None, timed(fn)
    release_memory()
    before = current_rss_bytes()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, current_rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        peak = max(peak, current_rss_bytes())
        del result
    finally:
        done.set()
        sampler.join()
    return max(0, peak - before) / 2**20, elapsed


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of ``numerator[i] / denominator[i]``.

    Candidates are timed in interleaved rounds, so one round's pair saw the same machine state
    (another process, a frequency change); the median of per-round ratios is steadier than
    the ratio of two medians. Lists of different lengths were not timed in the same rounds:
    then the ratio of medians."""
    if len(numerator) != len(denominator) or not numerator:
        return median(numerator) / median(denominator)
    return median([a / b for a, b in zip(numerator, denominator, strict=True)])
