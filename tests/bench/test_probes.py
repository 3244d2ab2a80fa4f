"""The sparse benchmark's probes of the compiled kernel: its GEMMs alone and its matmul."""

from __future__ import annotations

import pytest
import torch

from attnkit import masks
from attnkit.backends import blocksparse, native
from attnkit.bench import probes
from attnkit.call import AttentionCall


def test_gemms_alone_run_the_plan_of_the_calls_the_kernel_runs() -> None:
    if native.load("blocksparse_cpu") is None:
        pytest.skip(f"kernel unavailable: {native.unavailable('blocksparse_cpu')}")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, 4, 16, generator=g)
    k, v = (torch.randn(2, 64, 2, 16, generator=g) for _ in range(2))
    for dtype, expected in ((torch.float32, True), (torch.bfloat16, True), (torch.float16, False)):
        x = (q.to(dtype), k.to(dtype), v.to(dtype))
        gemms = probes.gemms_alone(AttentionCall(*x, mask=masks.causal()))
        assert (gemms is not None) == expected
        if gemms is not None:
            out, _ = gemms()
            assert out.shape == (*q.shape[:3], v.shape[-1])


@pytest.mark.parametrize("gemm", ["brgemm", "blas"])
def test_kernel_matmul_is_a_matmul_on_either_gemm(gemm: str) -> None:
    kernel = native.load("blocksparse_cpu")
    if kernel is None:
        pytest.skip(f"kernel unavailable: {native.unavailable('blocksparse_cpu')}")
    kernel.use_brgemm(gemm == "brgemm")
    try:
        if blocksparse.kernel_gemm(torch.float32) != gemm:
            pytest.skip(f"{gemm} does not run on this CPU")
        g = torch.Generator().manual_seed(0)
        # sizes that leave partial 256-blocks in every dimension, rows padded as the bench does
        a = torch.randn(300, 530, generator=g)[:, :520]
        b = torch.randn(520, 290, generator=g)
        out = torch.full((300, 300), float("nan"))[:, :270]
        assert probes.kernel_matmul(a, b[:, :270], out)
        expected = a.double().mm(b[:, :270].double())
        # float32 sums of 520 products of N(0, 1) pairs: errors around 1e-5
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-4)
    finally:
        kernel.use_brgemm(True)


def test_kernel_matmul_refuses_what_it_cannot_multiply() -> None:
    if native.load("blocksparse_cpu") is None:
        pytest.skip(f"kernel unavailable: {native.unavailable('blocksparse_cpu')}")
    a, b, out = torch.ones(4, 3), torch.ones(3, 5), torch.empty(4, 5)
    with pytest.raises(RuntimeError, match="float32"):
        probes.kernel_matmul(a.double(), b.double(), out.double())
    with pytest.raises(RuntimeError, match=r"a \[m, k\], b \[k, n\]"):
        probes.kernel_matmul(a, b.t(), out)
    with pytest.raises(RuntimeError, match="consecutive"):
        probes.kernel_matmul(a, torch.ones(5, 3).t(), out)
