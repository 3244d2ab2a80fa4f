"""BASED — "Simple linear attention language models balance the recall-throughput tradeoff",
Arora, Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra, Ré (2024).

Two parts, summed here in one call:

- linear attention with the 2nd-order Taylor feature map of ``exp``, on small projected
  queries/keys ``f_q, f_k [.., Df]`` (BASED uses ``Df = 16``):
  ``phi(x) = [1, x / Df^(1/4), vec(x x^T) / (sqrt(2) sqrt(Df))]``, so that
  ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(Df)``; normalised by
  ``phi(q) . sum phi(k)``. Its state grows with ``Df^2``, not with ``T``;
- exact softmax attention over a small causal sliding window of ``window`` keys (the query's
  own key and ``window - 1`` before it), via ``attnkit.attention`` with
  ``masks.sliding_window(window - 1)``.

BASED stacks the two as separate layers of a hybrid model; a layer that wants them apart calls
``linear_attention``-style parts itself. The recurrent state is fixed-size: the linear state
plus the last ``window - 1`` keys and values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit import masks
from attnkit.api import attention
from attnkit.linear._common import check_qkv, pick
from attnkit.linear.chunked import LinearProblem, solve
from attnkit.linear.state import LinearState

PAPER = (
    "Simple linear attention language models balance the recall-throughput tradeoff — Arora, "
    "Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra, Ré (2024)"
)


@dataclass(frozen=True)
class BasedState:
    """BASED's fixed-size state.

    Attributes:
        linear: the Taylor linear attention's ``LinearState`` (``kv [B, Hkv, F, Dv]``,
            ``z [B, Hkv, F]``, ``F = 1 + Df + Df^2``).
        keys, values: the last ``min(seen, window - 1)`` keys ``[B, L, Hkv, D]`` and values
            ``[B, L, Hkv, Dv]`` for the sliding window.
    """

    linear: LinearState
    keys: Tensor
    values: Tensor


def based_problem(
    feature_q: Tensor, feature_k: Tensor, v: Tensor, *, eps: float = 1e-6
) -> LinearProblem:
    """The Taylor linear-attention half of BASED as a ``LinearProblem`` (the map is applied
    by the problem, see ``attnkit.linear.features``)."""
    return LinearProblem(feature_q, feature_k, v, normalize=True, eps=eps, feature_map="taylor")


def _window_dense(q: Tensor, k: Tensor, v: Tensor, mask, scale: float | None) -> Tensor:
    return attention(q, k, v, mask=mask, scale=scale, backend="reference")


def _window_fast(q: Tensor, k: Tensor, v: Tensor, mask, scale: float | None) -> Tensor:
    return attention(q, k, v, mask=mask, scale=scale)


def _window_recurrent(q: Tensor, k: Tensor, v: Tensor, mask, scale: float | None) -> Tensor:
    T, past = q.shape[1], k.shape[1] - q.shape[1]
    return torch.cat(
        [
            attention(
                q[:, t : t + 1], k[:, : past + t + 1], v[:, : past + t + 1], mask=mask, scale=scale
            )
            for t in range(T)
        ],
        dim=1,
    )


#: The sliding-window softmax half per form: dense reference, ``attnkit.attention`` on the
#: fastest backend, or one query at a time against the window cache (decoding).
_WINDOW: dict[str, Callable[..., Tensor]] = {
    "reference": _window_dense,
    "chunked": _window_fast,
    "recurrent": _window_recurrent,
}


def based(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_q: Tensor,
    feature_k: Tensor,
    window: int = 64,
    scale: float | None = None,
    eps: float = 1e-6,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: BasedState | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, BasedState]:
    """BASED (Arora et al., 2024): Taylor linear attention plus sliding-window softmax.

    Args:
        q, k, v: ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]``: the window half.
        feature_q, feature_k: ``[B, T, Hq, Df]``, ``[B, T, Hkv, Df]``: the small projected
            queries/keys of the Taylor linear half (BASED: ``Df = 16``).
        window: keys per softmax window (the query's own and ``window - 1`` before it).
        scale: the window's score scale (``1/sqrt(D)``).
        eps: added to the linear half's denominator.
        form, chunk_size: as in ``linear_attention`` (the window half of ``chunked`` runs on
            ``attnkit.attention``'s fastest backend).
        initial_state, return_state: a ``BasedState`` in and out.

    Returns:
        ``out [B, T, Hq, Dv]``: linear half + window half.
    """
    check_qkv(q, k, v)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (keys per window), got {window!r}")
    window_part = pick(_WINDOW, form, "form")
    problem = based_problem(feature_q, feature_k, v, eps=eps)
    if feature_q.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"feature_q {tuple(feature_q.shape)} must match q {tuple(q.shape)} on batch, "
            "length and heads"
        )
    if initial_state is not None and not isinstance(initial_state, BasedState):
        raise TypeError(f"initial_state must be a BasedState, got {type(initial_state).__name__}")
    past_k = k[:, :0] if initial_state is None else initial_state.keys.to(k.dtype)
    past_v = v[:, :0] if initial_state is None else initial_state.values.to(v.dtype)
    if past_k.shape[1] > window - 1:
        raise ValueError(
            f"initial_state holds {past_k.shape[1]} window keys, more than window - 1 = "
            f"{window - 1}: it was made with a larger window"
        )
    linear, linear_state = solve(
        problem,
        form=form,
        chunk_size=chunk_size,
        initial_state=None if initial_state is None else initial_state.linear,
        return_state=True,
    )
    keys, values = (
        (k, v)
        if past_k.shape[1] == 0
        else (torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1))
    )
    local = window_part(q, keys, values, masks.sliding_window(window - 1), scale)
    out = linear + local
    if not return_state:
        return out
    keep = min(window - 1, keys.shape[1])
    start = keys.shape[1] - keep
    return out, BasedState(linear_state, keys[:, start:], values[:, start:])
