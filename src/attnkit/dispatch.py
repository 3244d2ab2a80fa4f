"""``backend="auto"``: rank the backends by an estimated cost, measured on this project's CPU.

Cost is in units of one dense SDPA call of the same shape. Each backend's estimate is its
measured time per computed (q, k) pair relative to dense SDPA, times the fraction of tiles it
must compute (the mask's analytic block structure). Constants come from ``attnkit bench`` and
the measurements in the backends' docstrings (2-core CPU, torch 2.13, B=1, H=8, D=64,
T=1024-8192; medians of 3):

- SDPA: causal on square inputs uses ``is_causal`` (0.53-0.74 of dense, more at short T); a
  dense mask ~1.1; an additive bias goes through a float mask, ~3.4x slower than
  ``is_causal`` (ALiBi T=1024: 50 ms vs 10-15 ms) and ~1.6x with gradients.
- FlexAttention (forward only on the CPU), per live 128x128 tile: ~1.35x dense SDPA in float32
  and ~1.75x in bfloat16 with a sparse mask (window 256, causal, documents at T=8192), but
  ~3.4x without a mask; score functions other than plain softmax ~1.3x more. Grid masks
  (neighborhoods, halos) cost ~3.5 more per partial tile: their predicate's index arithmetic
  runs per pair inside the kernel (2-D 13x13 NA: 109 vs 40 ms at T=4096, 794 vs 236 ms at
  T=16384 against blocksparse).
- chunked: forward ~1.4-1.8x dense SDPA per live tile, ~2x more with a score function or bias
  computed in plain PyTorch (sigmoid causal T=1024: 39 vs 18 ms on Flex); with gradients
  ~2.8x dense SDPA's forward+backward per live tile (window 256, T=4096: 254 vs 855 ms).
- blocksparse (softmax, soft-capped in the kernel), per live tile of its own tile shape:
  float32 through its compiled kernel on oneDNN's brgemm ~0.48x dense SDPA forward and ~0.51x
  forward+backward (dense T=8192 188 vs 394 ms; SDPA's float32 kernel calls MKL, which on this
  AMD CPU runs AVX2 code at ~100 GFLOP/s per core where brgemm's AVX-512 reaches ~245), ~0.97x
  where the kernel falls back to the BLAS; plus 0.15-0.6 per partial tile
  (``BLOCKSPARSE_PARTIAL``); bfloat16 on bf16 brgemm ~0.27x forward and ~0.45x
  forward+backward, ~0.39x and ~0.58x on oneDNN's matmul primitive (SDPA's bf16 kernel reaches
  neither); a soft cap's tanh ~1.75-2.2x more (``BLOCKSPARSE_SOFTCAP``); through batched
  matmuls (no compiler) float32 ~1.2x, bfloat16 ~0.6x forward and ~0.8x forward+backward;
  float16 matmuls have no fast path here (20x slower). Its fixed cost per call (~0.2 ms of
  Python and small ops for the batched path, less for the kernel) is charged as the pairs
  dense SDPA would process in that time, so short calls and decoding stay on SDPA.
- Flex compiles once per shape (seconds), so it is not chosen for short query blocks
  (decoding) or small problems, where compile time would dominate.
"""

from __future__ import annotations

import math

import torch

from attnkit.backends import blocksparse
from attnkit.backends.chunked import BLOCK_K, BLOCK_Q, MAX_KEYS
from attnkit.backends.sdpa import is_plain_causal
from attnkit.call import AttentionCall
from attnkit.masks.neighborhood import GridMask
from attnkit.scores import Softmax

#: SDPA ``is_causal`` relative to dense: ``0.5 + SDPA_CAUSAL_EDGE / T``, as its kernel also
#: computes the partly masked key blocks on the diagonal (measured: T=1024 0.72-0.74, 2048
#: 0.64, 4096 0.55, 8192 0.53).
SDPA_CAUSAL_EDGE = 224.0
SDPA_DENSE_MASK = 1.1
SDPA_BIAS = {False: 3.4, True: 1.6}  # keyed by needs_grad
FLEX_PER_LIVE = {False: 1.35, True: 1.75}  # keyed by half precision
#: Flex without a mask (every tile live) is ~2.5x slower per tile than with a sparse mask:
#: dense T=8192 fp32 1583 ms vs SDPA 462 ms, where causal costs 290 ms at half the tiles.
FLEX_DENSE = 2.5
FLEX_SCORE = 1.3
FLEX_GRID_PARTIAL = 3.5
CHUNKED_PER_LIVE = {False: 1.8, True: 2.8}
CHUNKED_SCORE = 2.0
#: bf16/fp16 forward without a mask: SDPA's half-precision CPU kernel reaches only about a third
#: of bf16 matmul throughput, and chunked's plain bf16 matmuls beat it while chunked's float32
#: score buffer per piece (B·Hq·BLOCK_Q·min(Tk, MAX_KEYS)·4 bytes) stays in cache. Measured
#: (ms, chunked vs SDPA): Hq=2, T=2048/4096/8192 (2-8 MB): 10.6/43.9/307 vs 14.0/58.9/353;
#: Hq=4, T=2048 (8 MB): 25 vs 31; Hq=4, T=4096/8192 (16 MB): 211/858 vs 122/480.
CHUNKED_HALF_DENSE = 0.85
CHUNKED_HALF_DENSE_MAX_BUFFER = 8 << 20
#: Keyed by (implementation, needs_grad). "kernel_brgemm" is the float32 kernel on oneDNN's
#: brgemm (``blocksparse.kernel_gemm``): dense T=4096/8192 forward 46/188 ms vs SDPA 97/394,
#: forward+backward 181/703 vs 351/1392 (causal 28/99 vs is_causal 55/213). "kernel_blas" is
#: the same kernel on the BLAS (MKL's AVX2 path on AMD). "kernel_bf16_brgemm" is the bfloat16
#: kernel on brgemm: dense T=4096/8192 forward 29/113 ms vs SDPA bf16 104/418, forward+backward
#: 119/453 vs 262/1045. "kernel_bf16_onednn_matmul" (at::mm, where bf16 brgemm does not run)
#: is fitted on `attnkit bench sparse --dtypes bfloat16` (28 cells, T=4k-32k, per live tile
#: 0.39 of dense SDPA bf16; T=4096 dense 40.8 ms); with gradients, forward+backward at T=4096
#: measured 0.57-0.58 of SDPA's (dense and causal).
BLOCKSPARSE_PER_LIVE = {
    ("kernel_brgemm", False): 0.48,
    ("kernel_brgemm", True): 0.51,
    ("kernel_blas", False): 0.97,
    ("kernel_blas", True): 0.97,
    ("kernel_bf16_brgemm", False): 0.27,
    ("kernel_bf16_brgemm", True): 0.45,
    ("kernel_bf16_onednn_matmul", False): 0.39,
    ("kernel_bf16_onednn_matmul", True): 0.58,
    ("float32", False): 1.2,
    ("float32", True): 1.2,
    ("bfloat16", False): 0.6,
    ("bfloat16", True): 0.8,
}
#: Extra cost of a PARTIAL tile (its 0/1 factor, and shorter runs), per tile. The brgemm kernels'
#: are fitted on `attnkit bench sparse` (T=4k-32k; per partial tile, beyond the per-live cost:
#: window 256 0.55-1.3 and documents 0.11-0.86 of a dense-SDPA tile, neighborhoods 0.08-0.25);
#: the others at T=8192 (kernel on the BLAS: window 256 0.054, documents 0.133 of dense SDPA;
#: batched float32: causal 0.63, window 256 0.088) and, for the bf16 kernel on at::mm, on the
#: same 28 cells as its per-tile cost.
BLOCKSPARSE_PARTIAL = {
    "kernel_brgemm": 0.6,
    "kernel_blas": 0.15,
    "kernel_bf16_brgemm": 0.45,
    "kernel_bf16_onednn_matmul": 0.2,
    "float32": 0.25,
    "bfloat16": 0.125,
}
BLOCKSPARSE_FLOAT16 = 20.0
#: A soft cap (in the kernel only) multiplies the per-tile cost: its tanh runs on every score
#: (T=8192: causal fp32 165 vs 94 ms, window 256 15.3 vs 10.3; bf16 132 vs 61, 12.6 vs 7.8).
BLOCKSPARSE_SOFTCAP = {False: 1.75, True: 2.2}  # keyed by half precision
#: Fixed cost per call as (query x key) pairs of dense SDPA: the kernel's is its plan lookup
#: and one C++ call (causal T=1024: 4.2 vs SDPA 5.2 ms; bf16 T=256: 0.32 vs 0.51 ms); the
#: batched path's, its Python loop.
BLOCKSPARSE_OVERHEAD_PAIRS = {"kernel": 0.5e5, "batched": 1.3e5}
#: Below this many (query × key) pairs, or fewer queries than one Flex tile, compile time
#: outweighs any kernel speedup.
FLEX_MIN_PAIRS = 512 * 512
FLEX_MIN_QUERIES = 128


def _live_fraction(call: AttentionCall, block_q: int, block_k: int) -> float:
    if call.mask is None:
        return 1.0
    return call.mask.blocks(call.Tq, call.Tk, block_q, block_k, call.device).live_fraction()


def _plain_softmax(call: AttentionCall) -> bool:
    return type(call.score) is Softmax and call.score.softcap is None


def _blocksparse_cost(call: AttentionCall) -> tuple[float, str]:
    block_q, block_k = blocksparse.tile_shape(call)
    live, partial = 1.0, 0.0
    if call.mask is not None:
        tiles = call.mask.blocks(call.Tq, call.Tk, block_q, block_k, call.device)
        live, partial = tiles.live_fraction(), tiles.partial_fraction
    pairs = call.B * call.Hq * call.Tq * call.Tk
    basis = f"computes {live:.0%} of {block_q}x{block_k} tiles"
    if call.dtype == torch.float16:
        overhead = BLOCKSPARSE_OVERHEAD_PAIRS["batched"] / pairs
        return BLOCKSPARSE_FLOAT16 * live + overhead, f"{basis} as float16 matmuls (no fast path)"
    kernel = blocksparse.uses_kernel(call)
    if kernel:
        gemm = blocksparse.kernel_gemm(call.dtype)
        implementation = f"kernel_{gemm}" if call.dtype == torch.float32 else f"kernel_bf16_{gemm}"
        how = "in the compiled kernel"
    else:
        implementation = "float32" if call.dtype == torch.float32 else "bfloat16"
        how = "as batched matmuls"
    overhead = BLOCKSPARSE_OVERHEAD_PAIRS["kernel" if kernel else "batched"]
    overhead /= pairs
    per_live = BLOCKSPARSE_PER_LIVE[implementation, call.needs_grad]
    if call.score.softcap is not None:
        per_live *= BLOCKSPARSE_SOFTCAP[call.dtype != torch.float32]
        how += " with the soft cap"
    cost = per_live * live + BLOCKSPARSE_PARTIAL[implementation] * partial + overhead
    return cost, f"{basis} {how}"


def estimated_costs(call: AttentionCall) -> dict[str, tuple[float, str]]:
    """Estimated time of each fast backend for ``call`` in dense-SDPA units, with the basis."""
    grad = call.needs_grad
    costs: dict[str, tuple[float, str]] = {}

    sdpa_causal = 0.5 + SDPA_CAUSAL_EDGE / call.Tk
    sdpa = sdpa_causal if is_plain_causal(call) else SDPA_DENSE_MASK if call.mask else 1.0
    basis = "causal kernel" if is_plain_causal(call) else "dense mask" if call.mask else "dense"
    if call.bias is not None:
        sdpa *= SDPA_BIAS[grad]
        basis += " + bias as a float mask"
    costs["sdpa"] = (sdpa, f"computes every pair ({basis})")

    plain = _plain_softmax(call) and call.bias is None
    if call.Tq * call.Tk < FLEX_MIN_PAIRS or call.Tq < FLEX_MIN_QUERIES:
        costs["flex"] = (
            math.inf,
            f"compiles once per shape (seconds), not worth it for {call.Tq}x{call.Tk} "
            f"(needs >= {FLEX_MIN_QUERIES} queries and >= {FLEX_MIN_PAIRS} pairs)",
        )
    else:
        live = _live_fraction(call, 128, 128)
        half = call.dtype in (torch.bfloat16, torch.float16)
        flex = FLEX_PER_LIVE[half] * live * (1.0 if plain else FLEX_SCORE)
        if call.mask is None:
            flex *= FLEX_DENSE
        elif isinstance(call.mask, GridMask):
            tiles = call.mask.blocks(call.Tq, call.Tk, 128, 128, call.device)
            flex += FLEX_GRID_PARTIAL * tiles.partial_fraction
        costs["flex"] = (flex, f"computes {live:.0%} of 128x128 tiles in one compiled kernel")

    live = _live_fraction(call, BLOCK_Q, BLOCK_K)
    chunked = CHUNKED_PER_LIVE[grad] * live * (1.0 if plain else CHUNKED_SCORE)
    half = call.dtype in (torch.bfloat16, torch.float16)
    in_cache = (
        call.B * call.Hq * BLOCK_Q * min(call.Tk, MAX_KEYS) * 4 <= CHUNKED_HALF_DENSE_MAX_BUFFER
    )
    if plain and call.mask is None and not grad and half and in_cache:
        chunked = CHUNKED_HALF_DENSE
    costs["chunked"] = (chunked, f"computes {live:.0%} of {BLOCK_Q}x{BLOCK_K} tiles")
    costs["blocksparse"] = _blocksparse_cost(call)
    passes = len(call.passes())
    if passes > 1:  # a signed score runs once per sign
        costs = {
            name: (cost * passes, f"{why}, {passes} passes") for name, (cost, why) in costs.items()
        }
    return costs


def auto_preferences(call: AttentionCall) -> list[tuple[str, str]]:
    """Backends in order of preference for ``call``, each with the reason; the first whose
    ``supports`` accepts the call runs. The dense reference always comes last."""
    costs = estimated_costs(call)
    ranked = sorted(costs.items(), key=lambda item: item[1][0])
    order = [
        (name, why if math.isinf(cost) else f"estimated {cost:.2f}x the time of dense SDPA: {why}")
        for name, (cost, why) in ranked
    ]
    order.append(("reference", "only the dense reference can run this call"))
    return order
