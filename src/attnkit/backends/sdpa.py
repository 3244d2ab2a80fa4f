"""PyTorch's fused ``scaled_dot_product_attention``: dense softmax, fastest for plain dense.

Masks are passed as a dense boolean matrix (built once per mask and size and cached on the
mask), except a causal mask on square inputs, which uses ``is_causal``. Biases are added to
a float mask. SDPA returns no log-sum-exp, so calls that need one go elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.backends.base import Backend
from attnkit.call import AttentionCall
from attnkit.costs import CostTable
from attnkit.scores import Softmax


def _uses_is_causal(call: AttentionCall) -> bool:
    """True where SDPA's own causal mode computes the call's mask (``is_top_left_causal``)."""
    return call.mask is not None and call.mask.is_top_left_causal(call.Tq, call.Tk)


def _supports(call: AttentionCall) -> str | None:
    if type(call.score) is not Softmax:
        return f"sdpa computes only softmax attention (this call uses {call.score.describe()})"
    if call.score.softcap is not None:
        return "sdpa has no logit soft-capping"
    if call.needs_lse:
        return "sdpa does not return the log-sum-exp needed for the requested aux outputs"
    return None


def dense_attn_mask(call: AttentionCall) -> Tensor | None:
    """The additive/boolean ``attn_mask`` SDPA receives: ``[Bm, Hm, Tq, Tk]`` or None."""
    allowed = None
    if call.mask is not None and not _uses_is_causal(call):
        allowed = call.mask.cached(
            ("dense", call.Tq, call.Tk, str(call.device)),
            lambda: call.mask.dense(call.Tq, call.Tk, call.device),
        )
    if call.bias is None:
        return allowed
    if call.bias.parameters() or call.mask is None:
        return _biased_mask(call, allowed)
    # A fixed bias combined with this mask is reused across calls (building T x T costs more
    # than the attention at long lengths);
    # the key holds the bias object itself, so a new bias can never hit a stale entry.
    return call.mask.cached(
        ("sdpa_bias", call.bias, call.Tq, call.Tk, str(call.device), call.dtype),
        lambda: _biased_mask(call, allowed),
    )


def _biased_mask(call: AttentionCall, allowed: Tensor | None) -> Tensor:
    bias = call.bias.dense(call.Tq, call.Tk, call.device).to(call.dtype).unsqueeze(0)
    if _uses_is_causal(call):
        allowed = torch.ones(call.Tq, call.Tk, dtype=torch.bool, device=call.device).tril()
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias


def _run(call: AttentionCall) -> tuple[Tensor, Tensor | None]:
    attn_mask = dense_attn_mask(call)
    out = F.scaled_dot_product_attention(
        call.q.transpose(1, 2),
        call.k.transpose(1, 2),
        call.v.transpose(1, 2),
        attn_mask=attn_mask,
        is_causal=_uses_is_causal(call) and attn_mask is None,
        scale=call.scale,
        enable_gqa=call.groups > 1,
    )
    return out.transpose(1, 2), None


def _cost(call: AttentionCall, table: CostTable) -> tuple[float, str]:
    """Every pair: ``is_causal`` computes about half, plus its diagonal blocks; a boolean
    mask, or a bias (mask and bias in one float matrix), costs extra passes."""
    dtype, grad = call.dtype, call.needs_grad
    if call.bias is not None:
        cost, basis = table.value("sdpa.bias", dtype, grad), "bias and mask as a float mask"
    elif _uses_is_causal(call):
        cost, basis = 0.5 + table.value("sdpa.causal_edge", dtype, grad) / call.Tk, "causal kernel"
    elif call.mask is not None:
        cost, basis = table.value("sdpa.mask", dtype, grad), "dense mask"
    else:
        cost, basis = 1.0, "dense"
    return cost, f"computes every pair ({basis})"


BACKEND = Backend(
    name="sdpa",
    summary="torch scaled_dot_product_attention; dense softmax (masks as a dense matrix)",
    supports=_supports,
    run=_run,
    cost=_cost,
)
