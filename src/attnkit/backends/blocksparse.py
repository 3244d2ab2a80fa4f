"""Block-sparse softmax attention at matmul speed on the CPU, forward and backward.

The FlashAttention algorithm (Dao et al., 2022; FlashAttention-2, Dao, 2023) restricted to the
live tiles of the mask's block structure (the idea of block-sparse FlashAttention and of
"Generalized Neighborhood Attention", Hassani et al., 2025: speed-up = 1 / live fraction),
written as a few large batched matmuls per query block so that MKL/oneDNN do the work:

    for each query block (BLOCK_Q rows, the query heads of a KV group stacked as rows):
        for each run of consecutive live key tiles (at most MAX_KEYS keys):
            S  = scale · Q Kᵀ                     one bmm
            S += tile masks                       only on PARTIAL tiles (cached 0/-inf tiles)
            P  = exp(S - shift)                   one in-place pass
            acc += P · V,  sums += rowsum(P)      one bmm and one reduction
        out = acc / sums,  lse = shift + log(sums)

The shift. Softmax is invariant to a per-row shift; kernels use the running row max, which
costs a reduction pass and a rescale of the accumulator per key run. Here the shift is 0
whenever every score is provably in [-BOUND, BOUND] (Cauchy–Schwarz:
``|s_ij| <= scale·|q_i|·|k_j|``, checked once per call from the row norms): then exp neither
overflows nor underflows in float32, all runs share one shift and their contributions are just
summed. Calls whose bound is larger use the running max (online softmax), still exact.

The backward pass (a custom autograd function) recomputes P per tile from the saved
log-sum-exp, ``P = exp(S - lse)``, and forms ``dV += Pᵀ dO``, ``dS = P ⊙ (dO Vᵀ - Δ)`` with
``Δ = rowsum(dO ⊙ O)``, ``dQ += dS K``, ``dK += dSᵀ Q`` — FlashAttention-2's backward. GQA
needs no expansion: a group's query heads are rows of the same matmul, so ``Pᵀ dO`` and
``dSᵀ Q`` sum over the group by themselves.

Two implementations of these steps share the plan of live tiles:

- float32 on the CPU runs a compiled C++ kernel (``csrc/blocksparse_cpu.cpp``, built on first
  use by :mod:`attnkit.backends.native`): one work item per query block and head, its mask, exp
  and sums done in cache between two GEMM calls, as PyTorch's dense CPU flash kernel does. Its
  GEMMs are oneDNN's brgemm micro-kernels (through ATen's ``cpublas::brgemm``) where libtorch
  has them for the CPU, else the BLAS (:func:`kernel_gemm` says which). The difference is the
  CPU's vector width: MKL picks its code path by vendor and runs AVX2 on AMD CPUs, half of what
  an AVX-512 core can do, and SDPA's float32 kernel calls MKL, so on an AVX-512 AMD CPU brgemm
  lets the kernel run dense and causal attention faster than SDPA, forward and
  forward+backward; on the BLAS it runs about as fast as SDPA per live tile (measurements:
  docs/kernels.md). It uses 128-row query tiles instead of 256 when that cuts the live area
  enough, and 64x64 tiles when those cut it further (``KERNEL_TILES``, ``NARROW_GAIN``: narrow
  bands, documents, neighborhoods).
- bfloat16 runs the same kernel, forward and backward, on oneDNN's bf16 brgemm (its operands
  packed in VNNI layout once per call; with AVX512-BF16 it has twice float32's dot-product
  throughput), else through ``at::mm_out`` (oneDNN's matmul primitive, whose per-call cost
  small tiles feel). SDPA's bf16 CPU kernel reaches a fraction of either, so where bf16
  brgemm runs the kernel is faster than SDPA and Flex in bf16 (measurements:
  docs/kernels.md). Gradients accumulate in float32.
- float16, and everything where the kernel cannot be compiled, run the batched matmuls.

Scores, in the compiled kernel: softmax, sigmoid weights ``w = sigmoid(x + b)`` (Ramapuram et
al., 2024) and LSSA's softplus weights ``w = softplus(c_i x)``, ``c_i`` the log of the keys row
``i`` sees (Gao & Spratling, 2025), the last two final as computed, so that their rows need no
running max and no rescaling; and each half of Cog's signed weights (Lv et al.), softmax over
``|x|`` on the keys of the half's sign, two passes that ``attnkit.attention`` merges. Gemma 2's
soft cap composes with each (a tanh pass over each tile's scores, and tanh's derivative in the
backward). A bias of the head and the query-key offset alone (ALiBi, KERPLE, T5 buckets,
learned relative tables: ``Bias.offset_only``) comes as one ``[Hq, Tq + Tk - 1]`` table per
call, built from the bias's own ``value`` (so its parameters get their gradients through it),
never as a ``T × T`` tensor: a row's consecutive keys read consecutive entries, and the backward
sums each pair's gradient into its entry. The kernel returns ``out / Z`` and ``lse = log Z``
for every weight, so the backward is one formula, ``dS = (dP - Δ) ⊙ (dw/dx) / Z`` with
``(dw/dx) / Z`` = ``P`` for softmax and a Cog half (where its sign holds), ``P (1 - w)`` for
sigmoid and ``c_i sigmoid(c_i x) / Z`` for softplus. The batched matmuls compute plain softmax
only; other score functions and biases run on ``chunked`` or ``flex``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from attnkit.backends import native
from attnkit.backends.base import Backend
from attnkit.call import AttentionCall
from attnkit.costs import CostTable
from attnkit.masks.base import FULL
from attnkit.primitives import finite_or_zero, live_tile_runs
from attnkit.scores import CogPart, ScoreFunction, Sigmoid, Softmax, SoftplusL1

#: Tile sizes of the batched path's block structure; a query block's score buffer is at most
#: ``B · Hq · BLOCK_Q · MAX_KEYS`` floats (one head's ``block_q · MAX_KEYS`` in the kernel).
BLOCK_Q = 256
BLOCK_K = 128
MAX_KEYS = 512
#: The compiled kernel's tile shapes ``(block_q, block_k)``, widest first. Each narrower shape
#: is chosen when its live area is at most ``NARROW_GAIN`` of the shape chosen so far: smaller
#: GEMMs cost more per pair, so they must cut the live area by at least 5% (the timings behind
#: the threshold: docs/kernels.md).
KERNEL_TILES = ((BLOCK_Q, BLOCK_K), (128, 128), (64, 64))
NARROW_GAIN = 0.95
#: Largest |score| for which exp needs no shift: e^60 · 2^40 keys stays below float32's max.
BOUND = 60.0


#: Dtypes the compiled kernel runs, forward and backward.
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _kernel(call: AttentionCall) -> ModuleType | None:
    """The compiled kernel where it applies (``KERNEL_DTYPES`` on the CPU, and it compiles),
    else None."""
    if call.dtype not in KERNEL_DTYPES or call.device.type != "cpu":
        return None
    return native.load("blocksparse_cpu")


def uses_kernel(call: AttentionCall) -> bool:
    """True when ``call`` runs on the compiled kernel rather than the batched matmuls."""
    return _kernel(call) is not None


def tile_shape(call: AttentionCall) -> tuple[int, int]:
    """``(block_q, block_k)`` of the tiles this backend computes for ``call``."""
    if call.mask is None or not uses_kernel(call):
        return BLOCK_Q, BLOCK_K
    chosen, area = KERNEL_TILES[0], 1.0
    for shape in KERNEL_TILES:
        live = call.mask.blocks(call.Tq, call.Tk, *shape, call.device).live_fraction()
        if shape == KERNEL_TILES[0] or live <= NARROW_GAIN * area:
            chosen, area = shape, live
    return chosen


class _Plan:
    """What a call's mask means for this backend: its tile shape, the runs of each query block
    and, for its partial tiles, which pairs are kept (a 0/1 factor applied after exp: exact
    zeros) shaped to broadcast over ``[B, Hkv, G, bq, bk]``. ``call`` is None without a mask."""

    def __init__(
        self, Tq: int, Tk: int, block_q: int, block_k: int, call: AttentionCall | None = None
    ):
        self.block_q, self.block_k = block_q, block_k
        #: tiles per run: consecutive live tiles computed by one GEMM
        self.run_tiles = MAX_KEYS // block_k
        n_q, n_k = -(-Tq // block_q), -(-Tk // block_k)
        self.keep: dict[tuple[int, int], Tensor] = {}
        self._keep_by_dtype: dict[torch.dtype, dict[tuple[int, int], Tensor]] = {}
        if call is None:
            self.runs = [live_tile_runs([FULL] * n_k, self.run_tiles) for _ in range(n_q)]
            return
        structure = call.mask.blocks(Tq, Tk, block_q, block_k, call.device)
        rows = structure.union_over_batch_heads().tolist()
        self.runs = [live_tile_runs(row, self.run_tiles) for row in rows]
        mask, device, acc = call.mask, call.device, call.accumulation_dtype
        Bm, Hm = mask.batch_size, mask.num_heads
        b = torch.arange(Bm, device=device).view(-1, 1, 1, 1)
        h = torch.arange(Hm, device=device).view(1, -1, 1, 1)
        heads = (call.Hkv, call.groups) if Hm > 1 else (1, 1)
        for i, runs in enumerate(self.runs):
            for *_, tiles in runs:
                for j in tiles:  # only partial tiles are evaluated pair by pair
                    rows = torch.arange(i * block_q, min((i + 1) * block_q, Tq), device=device)
                    cols = torch.arange(j * block_k, min((j + 1) * block_k, Tk), device=device)
                    tile = mask.predicate(
                        b, h, rows.view(1, 1, -1, 1), cols.view(1, 1, 1, -1), Tq, Tk
                    ).expand(Bm, Hm, rows.numel(), cols.numel())
                    tile = tile.reshape(Bm, *heads, rows.numel(), cols.numel())
                    self.keep[i, j] = tile.to(acc)

    @functools.cached_property
    def blocked(self) -> dict[tuple[int, int], Tensor]:
        """The partial tiles as 0/-inf terms, for the batched path's running max."""
        return {
            key: torch.zeros_like(keep).masked_fill_(keep == 0, float("-inf"))
            for key, keep in self.keep.items()
        }

    def keep_as(self, dtype: torch.dtype) -> dict[tuple[int, int], Tensor]:
        """``keep`` in ``dtype`` (cached): a bfloat16 tile times a float32 factor is promoted
        to float32 and copied back, which costs more than the multiply itself."""
        if dtype not in self._keep_by_dtype:
            self._keep_by_dtype[dtype] = {key: t.to(dtype) for key, t in self.keep.items()}
        return self._keep_by_dtype[dtype]

    @property
    def kernel_tiles(self) -> tuple[Tensor | int, ...]:
        """The tile arguments of the compiled kernel's entry points: ``csr``, the tile shape
        and the tiles per run."""
        return (*self.csr, self.block_q, self.block_k, self.run_tiles)

    @functools.cached_property
    def csr(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The live tiles for the compiled kernel: ``row_ptr [n_q + 1]``, ``tiles [nnz]``,
        ``partial [nnz]`` (-1 = full tile, else an index into ``keep``) and the 0/1 factors
        ``keep [P, Bm, Hm, block_q, block_k]`` (zero-padded at the edges; Hm = 1 or Hq)."""
        row_ptr, tiles, partial, keep = [0], [], [], []
        for i, runs in enumerate(self.runs):
            for first, stop, partial_tiles in runs:
                for j in range(first, stop):
                    tiles.append(j)
                    partial.append(len(keep) if j in partial_tiles else -1)
                    if j in partial_tiles:
                        tile = self.keep[i, j]
                        tile = tile.reshape(tile.shape[0], -1, *tile.shape[-2:])
                        pad = (0, self.block_k - tile.shape[-1], 0, self.block_q - tile.shape[-2])
                        keep.append(torch.nn.functional.pad(tile.float(), pad))
            row_ptr.append(len(tiles))
        index = functools.partial(torch.tensor, dtype=torch.int64)
        empty = torch.zeros(0, 1, 1, self.block_q, self.block_k)
        packed = torch.stack(keep) if keep else empty
        return index(row_ptr), index(tiles), index(partial), packed.contiguous()


@functools.lru_cache(maxsize=16)
def _unmasked_plan(Tq: int, Tk: int, block_q: int, block_k: int) -> _Plan:
    """Without a mask a plan depends only on the lengths: one per shape, not one per call."""
    return _Plan(Tq, Tk, block_q, block_k)


def _plan(call: AttentionCall) -> _Plan:
    shape = tile_shape(call)
    if call.mask is None:
        return _unmasked_plan(call.Tq, call.Tk, *shape)
    key = ("blocksparse", call.Tq, call.Tk, str(call.device), call.accumulation_dtype,
           call.Hkv, call.groups, shape)  # fmt: skip
    return call.mask.cached(key, lambda: _Plan(call.Tq, call.Tk, *shape, call))


def _apply(
    s: Tensor, tiles: dict[tuple[int, int], Tensor], i: int, run, op: str, block_k: int
) -> Tensor:
    """``s [B, Hkv, G, bq, L]`` with each partial tile of ``run`` combined (``op``: ``add_``
    or ``mul_``) with its entry of ``tiles``."""
    first, _, partial = run
    for j in partial:
        tile = tiles[i, j]
        lo = (j - first) * block_k
        getattr(s[..., lo : lo + tile.shape[-1]], op)(tile)
    return s


def _scores(q_rows: Tensor, k: Tensor, cols: slice) -> Tensor:
    """Scores ``[B, Hkv, G, bq, L]`` (input dtype) of a query block against keys ``cols``."""
    B, Hkv, G, bq, _ = q_rows.shape
    keys = k[:, :, cols]
    return (q_rows.reshape(B, Hkv, G * bq, -1) @ keys.transpose(-1, -2)).view(B, Hkv, G, bq, -1)


#: exp takes a slow scalar fallback on inputs whose result underflows or is -inf, so
#: arguments are clamped here: e^-80 is below every kept weight's rounding, and masked pairs
#: are zeroed exactly by their 0/1 factor afterwards.
_EXP_FLOOR = -80.0


def _row_sums(p: Tensor, widened: Tensor) -> Tensor:
    """``p.sum(-1, keepdim=True)`` in ``widened``'s dtype, ``p [B, Hkv, R, L]``. A
    lower-precision ``p`` is widened into the reused buffer ``widened [B, Hkv, >=R, >=L]``:
    ``sum(dtype=...)`` would widen it into a fresh tensor per call, slower at long lengths."""
    if p.dtype == widened.dtype:
        return p.sum(dim=-1, keepdim=True)
    R, L = p.shape[-2:]
    return widened[:, :, :R, :L].copy_(p).sum(dim=-1, keepdim=True)


def _forward(
    q: Tensor, k: Tensor, v: Tensor, plan: _Plan, shifted: bool, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``q [B, Hkv, G, Tq, D]`` (pre-scaled), ``k``/``v`` ``[B, Hkv, Tk, D|Dv]`` ->
    ``out [B, Hkv, G, Tq, Dv]`` (input dtype) and ``lse [B, Hkv, G, Tq]`` (``acc``)."""
    B, Hkv, G, Tq, _ = q.shape
    Dv = v.shape[-1]
    out = torch.empty(B, Hkv, G, Tq, Dv, dtype=v.dtype, device=v.device)
    lse = torch.empty(B, Hkv, G, Tq, dtype=acc, device=v.device)
    widened = torch.empty(B, Hkv, G * plan.block_q, MAX_KEYS, dtype=acc, device=v.device)
    for i, runs in enumerate(plan.runs):
        rows = slice(i * plan.block_q, min((i + 1) * plan.block_q, Tq))
        q_rows = q[:, :, :, rows]
        bq = q_rows.shape[3]
        total = torch.zeros(B, Hkv, G * bq, Dv, dtype=acc, device=v.device)
        sums = torch.zeros(B, Hkv, G * bq, 1, dtype=acc, device=v.device)
        # The running max of each row's kept scores (-inf until it sees one); unshifted: 0.
        shift = torch.full(
            (B, Hkv, G, bq, 1), -math.inf if shifted else 0.0, dtype=acc, device=v.device
        )
        for run in runs:
            cols = slice(run[0] * plan.block_k, run[1] * plan.block_k)
            s = _scores(q_rows, k, cols)
            if shifted:
                s = _apply(s.to(acc), plan.blocked, i, run, "add_", plan.block_k)
                new_shift = torch.maximum(shift, s.amax(dim=-1, keepdim=True))
                finite = finite_or_zero(new_shift)
                rescale = torch.exp(shift - finite).view(B, Hkv, G * bq, 1)
                total.mul_(rescale)
                sums.mul_(rescale)
                shift = new_shift
                s = s.sub_(finite).clamp_(min=_EXP_FLOOR)
            # Unshifted scores lie in ±BOUND (masked pairs included), so exp runs in the
            # input dtype (bfloat16 keeps float32's exponent range) without conversions.
            p = _apply(s.exp_(), plan.keep_as(s.dtype), i, run, "mul_", plan.block_k)
            p = p.view(B, Hkv, G * bq, -1)
            sums += _row_sums(p, widened)
            total += (p.to(v.dtype) @ v[:, :, cols]).to(acc)
        sums = sums.view(B, Hkv, G, bq, 1)
        out[:, :, :, rows] = (
            total.view(B, Hkv, G, bq, Dv) / sums.clamp_min(torch.finfo(acc).tiny)
        ).to(v.dtype)
        lse[:, :, :, rows] = (finite_or_zero(shift) + torch.log(sums)).squeeze(-1)
    return out, lse


def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    grad_lse: Tensor | None,
    plan: _Plan,
    acc: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. the pre-scaled ``q`` and ``k``, ``v`` (shapes as in ``_forward``), from
    the output's and the lse's (``grad_lse`` like ``lse``, or None)."""
    B, Hkv, G, Tq, D = q.shape
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    delta = _delta(grad_out, out, lse, grad_lse).unsqueeze(-1)  # [B, Hkv, G, Tq, 1]
    finite_lse = finite_or_zero(lse).unsqueeze(-1)
    for i, runs in enumerate(plan.runs):
        rows = slice(i * plan.block_q, min((i + 1) * plan.block_q, Tq))
        q_rows, d_rows = q[:, :, :, rows], grad_out[:, :, :, rows]
        bq = q_rows.shape[3]
        q_flat = q_rows.reshape(B, Hkv, G * bq, D)
        d_flat = d_rows.reshape(B, Hkv, G * bq, -1)
        for run in runs:
            cols = slice(run[0] * plan.block_k, run[1] * plan.block_k)
            # Kept pairs have s - lse <= 0; masked ones may exceed it, hence the upper clamp
            # before they are zeroed.
            s = _scores(q_rows, k, cols).to(acc).sub_(finite_lse[:, :, :, rows])
            p = s.clamp_(_EXP_FLOOR, -_EXP_FLOOR).exp_()
            p = _apply(p, plan.keep, i, run, "mul_", plan.block_k)
            dp = (d_flat @ v[:, :, cols].transpose(-1, -2)).to(acc).view(p.shape)
            ds = dp.sub_(delta[:, :, :, rows]).mul_(p).view(B, Hkv, G * bq, -1)
            p = p.view(B, Hkv, G * bq, -1).to(v.dtype)
            dv[:, :, cols] += (p.transpose(-1, -2) @ d_flat).to(acc)
            ds = ds.to(q.dtype)
            dq[:, :, :, rows] += (ds @ k[:, :, cols]).to(acc).view(B, Hkv, G, bq, D)
            dk[:, :, cols] += (ds.transpose(-1, -2) @ q_flat).to(acc)
    return dq, dk, dv


def _delta(grad_out: Tensor, out: Tensor, lse: Tensor, grad_lse: Tensor | None) -> Tensor:
    """FlashAttention-2's ``Δ = rowsum(dO ⊙ O)`` in float32, less the lse's gradient: since
    ``∂lse_i / ∂s_ij = p_ij``, an lse gradient adds ``p ⊙ grad_lse`` to ``dS = p ⊙ (dP - Δ)``
    (the split-KV merge and other lse users differentiate through it). Rows that see no key
    (``lse = -inf``) take none."""
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is None:
        return delta
    return delta - torch.where(torch.isneginf(lse), 0.0, grad_lse.float())


class _BatchedAttention(torch.autograd.Function):
    """The batched-matmul implementation; q, k, v in ``[B, Hkv, (G,) T, D]`` layout."""

    @staticmethod
    def forward(ctx, q, k, v, plan, shifted, acc):  # type: ignore[override]
        out, lse = _forward(q, k, v, plan, shifted, acc)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.acc = plan, acc
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(
            q, k, v, out, lse, grad_out.contiguous(), grad_lse, ctx.plan, ctx.acc
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class _KernelAttention(torch.autograd.Function):
    """The compiled kernel; q, k, v, out in the caller's ``[B, T, H, D]`` layout, lse
    ``[B, Tq, Hq]``; ``offset_bias`` the bias by head and query-key offset ``[Hq, Tq + Tk - 1]``
    float32 (empty: no bias), whose gradient is computed when it requires one."""

    @staticmethod
    def forward(ctx, q, k, v, offset_bias, plan, kernel, shifted, score):  # type: ignore[override]
        tiles = plan.kernel_tiles
        out, lse = kernel.forward(q, k, v, *tiles, shifted, *score.arguments(offset_bias), True)
        ctx.save_for_backward(q, k, v, offset_bias, out, lse)
        ctx.tiles, ctx.kernel, ctx.score = tiles, kernel, score
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # type: ignore[override]
        q, k, v, offset_bias, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        delta = _delta(grad_out, out, lse, grad_lse).contiguous()
        finite_lse = finite_or_zero(lse)
        bias_grad = ctx.needs_input_grad[3]
        dq, dk, dv, dbias = ctx.kernel.backward(
            q,
            k,
            v,
            grad_out,
            finite_lse,
            delta,
            *ctx.tiles,
            *ctx.score.arguments(offset_bias),
            bias_grad,
        )  # float32 gradients
        dbias = dbias if bias_grad else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, None, None, None, None


@dataclass(frozen=True)
class _KernelScore:
    """What the compiled kernel computes of a call's scores: ``scale``, the soft cap (0: none),
    the weight (``KERNEL_WEIGHTS``), its parameter (sigmoid's bias, a Cog half's sign) and
    softplus's per-row factors ``[1|B, 1|Hq, Tq]`` (empty: 1)."""

    scale: float
    softcap: float
    weight: int
    parameter: float
    row_factors: Tensor

    def arguments(self, offset_bias: Tensor) -> tuple:
        return (
            self.scale,
            self.softcap,
            self.weight,
            self.parameter,
            offset_bias,
            self.row_factors,
        )


#: The kernel's weights (``Weight`` in csrc/blocksparse_cpu.cpp), by score class.
KERNEL_WEIGHTS: dict[type, int] = {Softmax: 0, Sigmoid: 1, SoftplusL1: 2, CogPart: 3}
#: Each weight's parameter: sigmoid's bias ``b``, a Cog half's sign.
_PARAMETERS: dict[type, Callable[[ScoreFunction, int], float]] = {
    Sigmoid: lambda score, Tk: score.resolved_bias(Tk),
    CogPart: lambda score, Tk: float(score.sign),
}


def _kernel_score(call: AttentionCall) -> _KernelScore:
    parameter = _PARAMETERS.get(type(call.score), lambda score, Tk: 0.0)(call.score, call.Tk)
    log_counts = call.log_counts()  # softplus's length scale: log of the keys each row sees
    return _KernelScore(
        float(call.scale),
        _softcap(call),
        KERNEL_WEIGHTS[type(call.score)],
        parameter,
        torch.empty(0) if log_counts is None else log_counts.float().contiguous(),
    )


def _offset_bias(call: AttentionCall) -> Tensor:
    """The call's bias by head and query-key offset ``d = j - pos_i`` as the kernel reads it:
    ``[Hq, Tq + Tk - 1]`` float32, entry ``d + Tk - 1`` (differentiable: gradients reach the
    bias's parameters through it); an empty tensor without a bias."""
    if call.bias is None:
        return torch.empty(0, device=call.device)
    h = torch.arange(call.Hq, device=call.device).view(-1, 1)
    offsets = torch.arange(1 - call.Tk, call.Tq, device=call.device).view(1, -1)
    table = call.bias.value(h, torch.zeros_like(offsets), offsets)
    return table.expand(call.Hq, offsets.shape[1]).float().contiguous()


def _kernel_inputs(call: AttentionCall) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as the kernel reads them: contiguous, in the caller's ``[B, T, H, D]`` layout."""
    return call.q.contiguous(), call.k.contiguous(), call.v.contiguous()


def kernel_launch(call: AttentionCall) -> tuple[ModuleType, tuple[Tensor, ...], tuple] | None:
    """The compiled kernel, its ``q, k, v`` and its plan's tile tensors for ``call``; None
    where the kernel does not run ``call``. (The benchmarks time its GEMMs alone with it.)"""
    kernel = _kernel(call)
    if kernel is None:
        return None
    return kernel, _kernel_inputs(call), _plan(call).kernel_tiles


def kernel_gemm(dtype: torch.dtype) -> str | None:
    """The GEMM the compiled kernel runs ``dtype`` tiles on here: ``"brgemm"`` (oneDNN's
    micro-kernels through ATen, where libtorch has them for this CPU), else ``"blas"`` (float32:
    the BLAS torch links) or ``"onednn_matmul"`` (bfloat16: ``at::mm``); None without the kernel
    or for other dtypes. On AVX-512 AMD CPUs, where MKL keeps to AVX2, brgemm is the faster of
    the two on tile shapes (``attnkit bench sparse`` prints both throughputs)."""
    kernel = native.load("blocksparse_cpu")
    if kernel is None or dtype not in KERNEL_DTYPES:
        return None
    return kernel.float32_gemm() if dtype == torch.float32 else kernel.bfloat16_gemm()


def needs_shift(call: AttentionCall) -> bool:
    """True unless every score is provably within ``±BOUND`` (then exp needs no shift) and the
    input dtype has float32's exponent range (float16 would overflow at e^11). A soft cap of
    at most ``BOUND`` bounds every score by itself. Sigmoid and softplus weights (at most 1, or
    growing linearly) need none; a bias may push a row's every score far below the others, so
    softmax with one is shifted, and so is a Cog half (a row may have no key of its sign)."""
    if type(call.score) in (Sigmoid, SoftplusL1):
        return False
    if call.dtype == torch.float16 or call.bias is not None or type(call.score) is CogPart:
        return True
    if 0 < _softcap(call) <= BOUND:
        return False
    with torch.no_grad():
        q_norm = call.q.detach().float().norm(dim=-1).max()
        k_norm = call.k.detach().float().norm(dim=-1).max()
    return bool(call.scale * q_norm * k_norm > BOUND) or not math.isfinite(call.scale)


def blocksparse_forward(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """Run ``call``. Returns ``out [B, Tq, Hq, Dv]`` and ``lse [B, Tq, Hq]``."""
    kernel = _kernel(call)
    if kernel is not None:
        return _KernelAttention.apply(
            *_kernel_inputs(call),
            _offset_bias(call),
            _plan(call),
            kernel,
            needs_shift(call),
            _kernel_score(call),
        )
    B, Hkv, G, Tq = call.B, call.Hkv, call.groups, call.Tq
    acc = call.accumulation_dtype
    q = (call.q * call.scale).transpose(1, 2).reshape(B, Hkv, G, Tq, call.D)
    k = call.k.transpose(1, 2).contiguous()
    v = call.v.transpose(1, 2).contiguous()
    out, lse = _BatchedAttention.apply(q, k, v, _plan(call), needs_shift(call), acc)
    out = out.reshape(B, call.Hq, Tq, call.Dv).transpose(1, 2)
    lse = lse.reshape(B, call.Hq, Tq).transpose(1, 2)
    return out, lse


def _softcap(call: AttentionCall) -> float:
    """The call's soft cap (Gemma 2's ``cap · tanh(s / cap)``), 0.0 for none."""
    return float(call.score.softcap or 0.0)


def _supports(call: AttentionCall) -> str | None:
    if call.score.signed:  # attnkit.attention runs a signed score as its two halves
        return next(filter(None, (_supports(part) for part in call.passes())), None)
    kernel = _kernel(call) is not None
    if type(call.score) not in KERNEL_WEIGHTS:
        return (
            f"blocksparse computes softmax, sigmoid, softplus-l1 and Cog only (this call uses "
            f"{call.score.describe()}); use chunked or flex"
        )
    extras = [
        what
        for what, used in (
            (f"computes {call.score.name} weights", type(call.score) is not Softmax),
            ("soft-caps scores", call.score.softcap is not None),
            ("adds a bias", call.bias is not None),
        )
        if used
    ]
    if extras and not kernel:
        return (
            f"blocksparse {' and '.join(extras)} only in its compiled kernel (float32 or "
            "bfloat16 on the CPU, with a C++ compiler); use chunked or flex"
        )
    if call.bias is not None and not call.bias.offset_only:
        return (
            f"blocksparse's kernel adds biases of the query-key offset only (ALiBi, KERPLE, "
            f"T5, relative tables), not {call.bias!r}; use chunked or flex"
        )
    if extras and not call.scale > 0:
        return f"blocksparse {' and '.join(extras)} only with a positive scale (got {call.scale})"
    return None


def _cost(call: AttentionCall, table: CostTable) -> tuple[float, str]:
    if table.capabilities.device != "cpu":
        return math.inf, (
            f"not a candidate on {table.capabilities.device}: its speed is the CPU kernel (its "
            "batched matmuls run anywhere when selected by name)"
        )
    dtype, grad = call.dtype, call.needs_grad
    if dtype == torch.bfloat16 and not table.capabilities.native_bfloat16:
        return math.inf, f"bf16 kernel: {table.capabilities.missing_bfloat16()}"
    if any(type(part.score) not in KERNEL_WEIGHTS for part in call.passes()):
        return math.inf, f"its kernel computes no {call.score.name} weights"
    block_q, block_k = tile_shape(call)
    live, partial = 1.0, 0.0
    if call.mask is not None:
        tiles = call.mask.blocks(call.Tq, call.Tk, block_q, block_k, call.device)
        live, partial = tiles.live_fraction(), tiles.partial_fraction
    per_live = table.value("blocksparse.per_live", dtype, grad)
    how = "in the compiled kernel" if uses_kernel(call) else "as batched matmuls"
    if call.score.softcap is not None:
        per_live *= table.value("blocksparse.softcap", dtype, grad)
        how += " with the soft cap"
    if type(call.score) is not Softmax:
        per_live *= table.value(f"blocksparse.score.{call.score.name}", dtype, grad)
        how += f" with {call.score.name} weights"
    if call.bias is not None:
        per_live *= table.value("blocksparse.bias", dtype, grad)
        how += f" with the {call.bias.name} bias"
    overhead = table.value("blocksparse.overhead_pairs", dtype, grad)
    overhead /= call.B * call.Hq * call.Tq * call.Tk
    cost = per_live * live + table.value("blocksparse.partial", dtype, grad) * partial + overhead
    return cost, f"computes {live:.0%} of {block_q}x{block_k} tiles {how}"


BACKEND = Backend(
    name="blocksparse",
    summary=(
        "softmax, sigmoid or softplus (+ offset biases) over live tiles: a compiled CPU kernel "
        "(fp32, bf16), or softmax as batched matmuls"
    ),
    supports=_supports,
    run=blocksparse_forward,
    cost=_cost,
)
