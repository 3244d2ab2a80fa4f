"""CUDA: every backend that claims the device is checked against the float64 golden there, and
``auto`` chooses among SDPA, Flex and chunked. Skipped without a GPU (``-m cuda`` selects
these; ``scripts/gpu_check.sh`` runs them and a GPU speed table)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnkit
from attnkit import calibration, masks, scores
from attnkit.backends import BACKENDS
from attnkit.bench.speed import quick_config, run_speed_bench
from attnkit.call import AttentionCall
from attnkit.testing import CASES, check_against_reference

pytestmark = pytest.mark.cuda


def _mask(name: str) -> masks.Mask:
    """The masks of these tests, made on the GPU (only when a test runs: collection needs none)."""
    return {
        "causal": masks.causal,
        "window": lambda: masks.sliding_window(5, 2),
        "documents": lambda: masks.documents(
            torch.tensor([[0] * 20 + [1] * 23 + [2] * 20], device="cuda")
        ),
        "padded": lambda: (
            masks.key_padding(torch.tensor([50], device="cuda"), side="left") & masks.causal()
        ),
    }[name]()


MASK_NAMES = ["causal", "window", "documents", "padded"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", MASK_NAMES)
@pytest.mark.parametrize("backend", ["sdpa", "flex", "chunked", "blocksparse"])
def test_backends_match_the_golden_on_cuda(backend: str, mask: str, dtype: torch.dtype) -> None:
    q, k, v = CASES["self_odd_63"].make(dtype, device="cuda")
    pattern = _mask(mask)
    call = AttentionCall(q, k, v, mask=pattern)
    if BACKENDS[backend].supports(call) is not None:
        pytest.skip(BACKENDS[backend].supports(call))
    run = partial(attnkit.attention, backend=backend)
    check_against_reference(run, q, k, v, mask=pattern).assert_ok()


def test_scores_run_on_cuda() -> None:
    q, k, v = CASES["gqa_8_2"].make(torch.float32, device="cuda")
    for backend in ("flex", "chunked"):
        run = partial(attnkit.attention, backend=backend)
        check_against_reference(
            run, q, k, v, mask=masks.causal(), score=scores.sigmoid()
        ).assert_ok()


def test_auto_on_cuda_never_chooses_the_cpu_kernel() -> None:
    x = torch.randn(1, 4096, 4, 64, device="cuda", dtype=torch.bfloat16)
    for mask in (None, masks.causal(), masks.sliding_window(255)):
        explanation = attnkit.explain(x, x, x, mask=mask)
        assert explanation.chosen in ("sdpa", "flex", "chunked")
        assert "not a candidate on cuda" in explanation.rejected["blocksparse"]


def test_calibration_on_cuda_measures_its_entries(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(calibration, "SHAPE", calibration.Shape(T=512, H=2, D=32))
    monkeypatch.setattr(calibration, "ROUNDS", 2)
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path))
    table = calibration.measure("cuda")
    assert table.capabilities.device == "cuda"
    names = {(name, dtype, grad) for name, dtype, grad, _ in table.rows()}
    for dtype in ("float32", "bfloat16", "float16"):
        for grad in (False, True):
            assert ("chunked.per_live", dtype, grad) in names
            assert ("flex.per_live", dtype, grad) in names
            assert ("blocksparse.per_live", dtype, grad) not in names


def test_the_bench_runs_on_cuda(tmp_path) -> None:
    config = quick_config(device="cuda", mechanisms=("causal", "sliding_window"))
    results = run_speed_bench(config)
    ran = [r for r in results.records if r.ran]
    assert ran and all(r.median_ms > 0 for r in ran)
    assert {r.role for r in ran} >= {"auto", "baseline", "backend"}
