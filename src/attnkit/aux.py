"""Aux outputs computed from a backend's log-normaliser, tile by tile.

Given ``lse_i``, the weight of pair (i, j) is ``exp(log w_ij - lse_i)`` (normalised scores) or
``exp(log w_ij)`` (unnormalised), times ``sign(s_ij)`` for signed scores (Cog: weights and
per-key sums keep their sign), so weights and per-key sums need only a second pass over
``q k^T`` for the queries asked about — never a stored ``Tq × Tk`` matrix (except when the
weights themselves are requested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.call import AttentionCall, AuxOutput
from attnkit.primitives import expand_kv_heads

_QUERY_TILE = 256
_KEY_TILE = 1024


def _query_index(selector: slice | Tensor, Tq: int, device: torch.device) -> Tensor:
    if isinstance(selector, slice):
        return torch.arange(Tq, device=device)[selector]
    idx = torch.as_tensor(selector, device=device)
    if idx.dtype == torch.bool:
        if idx.shape != (Tq,):
            raise ValueError(
                f"key_sums boolean query selector must have shape [{Tq}], got {tuple(idx.shape)}"
            )
        return idx.nonzero().flatten()
    idx = idx.long().flatten()
    if idx.numel() and (idx.min() < -Tq or idx.max() >= Tq):
        raise ValueError(
            f"key_sums query indices must lie in [-{Tq}, {Tq}), got {idx.tolist()[:8]}..."
        )
    return idx % Tq


def _weight_tiles(call: AttentionCall, lse: Tensor, q_idx: Tensor):
    """Yield ``(query positions in q_idx, key slice, weights [B, Hq, nq, nk] float32)``."""
    compute = call.accumulation_dtype
    log_counts = call.log_counts()
    k = expand_kv_heads(call.k.to(compute).transpose(1, 2), call.groups, dim=1)
    for qs in range(0, q_idx.numel(), _QUERY_TILE):
        rows = q_idx[qs : qs + _QUERY_TILE]
        q = call.q[:, rows].to(compute).transpose(1, 2)
        row_lse = lse[:, rows].transpose(1, 2).unsqueeze(-1).to(compute)
        for ks in range(0, call.Tk, _KEY_TILE):
            cols = torch.arange(ks, min(ks + _KEY_TILE, call.Tk), device=call.device)
            s = (q @ k[:, :, cols].transpose(-1, -2)) * call.scale
            lw = call.log_weights(s, rows, cols, log_counts=log_counts)
            w = call.tile_weights(s, lw, row_lse, rows, cols)
            yield slice(qs, qs + rows.numel()), slice(ks, ks + cols.numel()), w


@torch.no_grad()
def compute_aux(call: AttentionCall, lse: Tensor | None) -> AuxOutput:
    """Fill the ``AuxOutput`` requested by ``call.aux`` from the backend's ``lse``."""
    out = AuxOutput(lse=lse if call.aux.lse else None)
    if not (call.aux.weights or call.aux.key_sums is not None):
        return out
    assert lse is not None
    if call.aux.weights:
        all_q = torch.arange(call.Tq, device=call.device)
        # a float64 call's weights keep float64 precision (tests use them as a golden)
        weights = torch.empty(
            call.B, call.Hq, call.Tq, call.Tk, dtype=call.accumulation_dtype, device=call.device
        )
        for rows, cols, w in _weight_tiles(call, lse, all_q):
            weights[:, :, rows, cols] = w
        out.weights = weights.to(call.dtype)
    if call.aux.key_sums is not None:
        q_idx = _query_index(call.aux.key_sums, call.Tq, call.device)
        sums = torch.zeros(call.B, call.Hq, call.Tk, device=call.device)
        for _, cols, w in _weight_tiles(call, lse, q_idx):
            sums[:, :, cols] += w.sum(dim=2).float()
        out.key_sums = sums
    return out
