"""The oracle: dense attention in float32/float64 that a reader can check against a paper.

s    = scale * q k^T                      [B, Hq, Tq, Tk]  (k/v heads repeated for GQA)
lw   = log w(softcap(s + bias)), -inf where the mask forbids
lse  = logsumexp_j lw                     [B, Hq, Tq]
p    = exp(lw - lse)                      (0 on masked pairs and fully masked rows)
p    = sign(softcap(s + bias)) * p        (signed scores only: Cog)
out  = p v, times exp(lse) for unnormalised scores (sigmoid)
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.backends.base import Backend
from attnkit.call import AttentionCall
from attnkit.primitives import accumulation_dtype, expand_kv_heads


def reference_forward(
    call: AttentionCall, compute_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Dense attention for ``call``; returns the normalised ``out [B, Tq, Hq, Dv]`` (in the
    input dtype) and ``lse [B, Tq, Hq]`` (float32, or float64 for float64 compute).

    ``compute_dtype`` defaults to float32 for half-precision inputs and to the input dtype
    otherwise; ``attnkit.testing`` passes the input dtype to measure a same-precision baseline.
    """
    if compute_dtype is None:
        compute_dtype = call.accumulation_dtype
    # a backend returns row-normalised outputs for every score; finalize rescales them
    p, lse = call.dense_weights(compute_dtype, normalize=True)
    v = expand_kv_heads(call.v.to(compute_dtype).transpose(1, 2), call.groups, dim=1)
    out = p @ v
    lse_dtype = accumulation_dtype(compute_dtype)
    return out.transpose(1, 2).to(call.dtype), lse.transpose(1, 2).to(lse_dtype)


def _supports(call: AttentionCall) -> str | None:
    return None


BACKEND = Backend(
    name="reference",
    summary="dense math in float32/float64, every feature; the oracle (slow, O(T^2) memory)",
    supports=_supports,
    run=reference_forward,
)
