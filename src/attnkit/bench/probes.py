"""Probes of what the compiled block-sparse kernel could reach, for the sparse benchmark:
its GEMMs alone on a call's tiles (a bound on the kernel's time) and the matmul throughput of
the GEMM it calls. Their outputs are not attention."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnkit.backends import blocksparse, native
from attnkit.call import AttentionCall


def gemms_alone(call: AttentionCall) -> Callable[[], object] | None:
    """A function running the compiled kernel's GEMM calls for ``call`` (with
    the packing of their operands, and in bfloat16 the rounding of P) with the per-row softmax
    steps between them skipped; its output is not attention. Its time is what the plan's tiles
    cost at this GEMM's speed: a bound on the kernel's time. None where the kernel does not run
    ``call``."""
    launch = blocksparse.kernel_launch(call)
    if launch is None:
        return None
    kernel, (q, k, v), tiles = launch
    empty = torch.empty(0)
    return lambda: kernel.forward(
        q, k, v, *tiles, False, float(call.scale), 0.0, 0, 0.0, empty, empty, False
    )


def kernel_matmul(a: Tensor, b: Tensor, out: Tensor) -> bool:
    """``out = a @ b`` for float32 matrices with unit column stride, through the GEMM the
    compiled kernel calls in float32 (``blocksparse.kernel_gemm``), in cache-sized blocks over all
    threads: the benchmarks' probe of the matmul throughput this kernel can reach. False
    (``out`` untouched) without the kernel."""
    kernel = native.load("blocksparse_cpu")
    if kernel is None:
        return False
    kernel.matmul_into(a, b, out)
    return True
