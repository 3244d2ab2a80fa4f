"""Chunked attention in plain PyTorch: online softmax over the live key blocks of each query block.

"Self-attention Does Not Need O(n^2) Memory" (Rabe & Staats, 2021) and the tiling of
FlashAttention (Dao et al., 2022), written with batched matmuls:

    for each query block (``block_q`` rows):
        live key blocks = tiles of the mask's block structure that are not EMPTY
        consecutive live blocks form pieces of at most ``MAX_KEYS`` keys (``live_tile_runs``)
        for each piece: s = scale q k^T, log-weights (the mask is applied only if a tile in the
            piece is PARTIAL), then (out_piece, lse_piece) = normalised rows
        merge the pieces with the LSE merge (attnkit.merge)

Any score function works (pieces carry log-weights and their lse: ``attnkit.scores``), GQA runs
without expanding k/v (query heads of a group are stacked along the rows of one matmul), and
empty tiles cost nothing. Memory is O(Tq · Tk_live / n_blocks) per block: with gradients, each
query block is recomputed in the backward pass (activation checkpointing), so only the
per-block outputs and log-normalisers are kept — O(T · block) in all, never O(T^2).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnkit.backends.base import Backend
from attnkit.call import AttentionCall
from attnkit.costs import CostTable
from attnkit.masks.base import FULL
from attnkit.merge import merge
from attnkit.primitives import TileRun, finite_or_zero, live_tile_runs
from attnkit.scores import Softmax

#: Query rows per block and key columns per tile. 256 × 256 tiles keep the per-piece score
#: matrix in cache-friendly sizes; measured with ``attnkit bench``. Each backend measured its
#: own sizes: a piece here is a dozen PyTorch ops over every batch entry and head (the score
#: pipeline included), each with a fixed cost per call, so pieces are long (up to
#: ``MAX_KEYS``); blocksparse's GEMMs work in cache on tiles of one head, where narrower tiles
#: that skip more of a sparse mask pay off (256 × 128, runs of 512 keys).
BLOCK_Q = 256
BLOCK_K = 256
#: Longest run of keys computed in one matmul. It bounds the score buffer of a query block
#: (256 × 1024 per head) so that the score pipeline's passes over it stay in cache: longer
#: runs cost more per pair, so a chunked call's cost per pair would grow with its length. At
#: most the calibration's length (``attnkit.calibration.SHAPE.T``), so that the cost per pair
#: measured there holds at every length.
MAX_KEYS = 1024


def _query_block(
    call: AttentionCall,
    q_rows: Tensor,
    k: Tensor,
    v: Tensor,
    row_start: int,
    runs: list[TileRun],
    log_counts: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Attention for one query block over its ``runs`` of live key tiles. ``q_rows``
    ``[B, Hkv, G * bq, D]`` (heads of a group stacked, already multiplied by the scale),
    ``k``/``v`` ``[B, Hkv, Tk, D|Dv]``. Returns ``out [B, Hq, bq, Dv]`` and ``lse [B, Hq, bq]``
    in float32 (float64 for float64 inputs)."""
    B, Hq, G = call.B, call.Hq, call.groups
    bq = q_rows.shape[2] // G
    q_idx = torch.arange(row_start, row_start + bq, device=q_rows.device)
    # Without autograd the score buffer is updated in place: one buffer, three passes over it.
    in_place = not torch.is_grad_enabled()
    acc = call.accumulation_dtype
    out = lse = None
    for run in runs:
        k_start, k_stop = run.first * BLOCK_K, min(run.stop * BLOCK_K, call.Tk)
        k_idx = torch.arange(k_start, k_stop, device=q_rows.device)
        s = (q_rows @ k[:, :, k_start:k_stop].transpose(-1, -2)).to(acc).view(B, Hq, bq, -1)
        lw = call.log_weights(s, q_idx, k_idx, apply_mask=run.has_partial, log_counts=log_counts)
        # The result does not depend on the shift; keeping it out of autograd avoids a gradient
        # that cancels only up to rounding at each row's argmax.
        row_max = lw.detach().amax(dim=-1, keepdim=True)
        row_max = finite_or_zero(row_max)
        p = lw.sub_(row_max).exp_() if in_place else torch.exp(lw - row_max)
        row_sum = p.sum(dim=-1)
        p = p.view(B, call.Hkv, G * bq, -1).to(v.dtype)
        piece_out = (p @ v[:, :, k_start:k_stop]).to(acc).view(B, Hq, bq, -1)
        piece_out = piece_out / row_sum.clamp_min(torch.finfo(acc).tiny).unsqueeze(-1)
        piece_lse = row_max.squeeze(-1) + torch.log(row_sum)
        if out is None:
            out, lse = piece_out, piece_lse
        else:
            out, lse = merge(out, lse, piece_out, piece_lse)
    if out is None:
        out = torch.zeros(B, Hq, bq, call.Dv, dtype=acc, device=q_rows.device)
        lse = torch.full((B, Hq, bq), float("-inf"), dtype=acc, device=q_rows.device)
    return out, lse


def chunked_forward(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """Run ``call`` block by block. Returns ``out [B, Tq, Hq, Dv]`` (input dtype) and
    ``lse [B, Tq, Hq]`` (float32; float64 for float64 inputs)."""
    B, Hkv, G, Tq, Tk = call.B, call.Hkv, call.groups, call.Tq, call.Tk
    if call.mask is None:
        n_q, n_k = -(-Tq // BLOCK_Q), -(-Tk // BLOCK_K)
        kinds = torch.full((n_q, n_k), FULL, dtype=torch.int8)
    else:
        kinds = call.mask.blocks(Tq, Tk, BLOCK_Q, BLOCK_K, call.device).union_over_batch_heads()
    kinds = kinds.cpu()
    q = (call.q * call.scale).transpose(1, 2).reshape(B, Hkv, G, Tq, call.D)
    k = call.k.transpose(1, 2).contiguous()
    v = call.v.transpose(1, 2).contiguous()
    log_counts = call.log_counts()
    recompute = call.needs_grad
    if recompute and call.bias is not None and call.bias.parameters():
        # A learned bias's gradient sums over every (q, k) pair, arriving here as one partial
        # sum per tile; cast once so the partials accumulate in float64 and round only once.
        call = dataclasses.replace(call, bias=call.bias.to(torch.float64))
    outs, lses = [], []
    for i in range(kinds.shape[0]):
        row_start, row_stop = i * BLOCK_Q, min((i + 1) * BLOCK_Q, Tq)
        q_rows = q[:, :, :, row_start:row_stop].reshape(B, Hkv, G * (row_stop - row_start), call.D)
        runs = live_tile_runs(kinds[i].tolist(), MAX_KEYS // BLOCK_K)
        args = (call, q_rows, k, v, row_start, runs, log_counts)
        if recompute:
            out, lse = checkpoint(_query_block, *args, use_reentrant=False)
        else:
            out, lse = _query_block(*args)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(call.dtype)
    lse = torch.cat(lses, dim=2).transpose(1, 2)
    return out, lse


def _supports(call: AttentionCall) -> str | None:
    return None


def _cost(call: AttentionCall, table: CostTable) -> tuple[float, str]:
    # Without a mask each query block is one long matmul: a different cost per tile.
    live, entry = 1.0, "chunked.dense"
    if call.mask is not None:
        live = call.mask.blocks(call.Tq, call.Tk, BLOCK_Q, BLOCK_K, call.device).live_fraction()
        entry = "chunked.per_live"
    cost = table.value(entry, call.dtype, call.needs_grad) * live
    if not (type(call.score) is Softmax and call.score.softcap is None):
        cost *= table.value("chunked.score", call.dtype, call.needs_grad)
    if call.bias is not None:
        cost *= table.value("chunked.bias", call.dtype, call.needs_grad)
    pairs = call.B * call.Hq * call.Tq * call.Tk
    cost += table.value("chunked.overhead_pairs", call.dtype, call.needs_grad) / pairs
    return cost, f"computes {live:.0%} of {BLOCK_Q}x{BLOCK_K} tiles"


BACKEND = Backend(
    name="chunked",
    summary="online softmax over live key blocks in plain PyTorch; any score, autograd, O(T) mem",
    supports=_supports,
    run=chunked_forward,
    cost=_cost,
)
