"""Gated linear attention — "Gated Linear Attention Transformers with Hardware-Efficient
Training", Yang, Wang, Shen, Panda, Kim (2024); bidirectional as in ViG ("ViG: Linear-complexity
Visual Sequence Learning with Gated Linear Attention", Liao, Wang, Zhu, Zhang, Huang, 2024).

Data-dependent gates ``alpha_t in (0, 1]^Dk`` decay each key dimension of the state:

    S_t = diag(alpha_t) S_(t-1) + k_t^T v_t,        o_t = scale * q_t S_t

Gates are passed as ``log_gate = log alpha_t <= 0`` (e.g. ``F.logsigmoid(x) / 16``, the
paper's normalised gate). The chunked form is GLA's chunkwise form with cumulative log-gates
inside each chunk and secondary chunking for the intra-chunk pairs, so every evaluated
exponent is <= 0 (no overflow in float32 however strong the gates). With all gates 1 it is
plain linear attention with the identity feature map.

``causal=False`` is ViG's bidirectional GLA: a forward scan plus a backward scan (on the
reversed sequence, with its own ``backward_log_gate``), summed; the diagonal term
``q_i . k_i v_i`` is counted by both scans, as in ViG.
"""

from __future__ import annotations

import math

from torch import Tensor

from attnkit.linear._common import no_state
from attnkit.linear.chunked import LinearProblem, solve
from attnkit.linear.state import LinearState

PAPER = (
    "Gated Linear Attention Transformers with Hardware-Efficient Training — Yang, Wang, Shen, "
    "Panda, Kim (2024); bidirectional: ViG: Linear-complexity Visual Sequence Learning with "
    "Gated Linear Attention — Liao, Wang, Zhu, Zhang, Huang (2024)"
)


def gla_problem(
    q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor, *, scale: float | None = None
) -> LinearProblem:
    """The causal GLA recurrence of this call (``log_gate [B, T, Hkv, Dk]`` or ``[.., 1]``)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return LinearProblem(q, k, v, log_gate, scale=scale)


def gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gate: Tensor,
    *,
    causal: bool = True,
    backward_log_gate: Tensor | None = None,
    scale: float | None = None,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: LinearState | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, LinearState]:
    """Gated linear attention of ``q [B, T, Hq, Dk]`` over ``k [B, T, Hkv, Dk]``,
    ``v [B, T, Hkv, Dv]`` with gates ``log_gate [B, T, Hkv, Dk]`` (``<= 0``; ``[.., 1]`` for one
    gate per head).

    Args:
        causal: True: the GLA recurrence; False: ViG's bidirectional sum of a forward and a
            backward scan (no state in or out).
        backward_log_gate: gates of the backward scan (default: ``log_gate``).
        scale: ``1/sqrt(Dk)`` by default.
        form, chunk_size, initial_state (``LinearState(kv [B, Hkv, Dk, Dv])``), return_state:
            as in ``linear_attention``.

    Returns:
        ``out [B, T, Hq, Dv]`` (and the final state).
    """
    if causal:
        if backward_log_gate is not None:
            raise ValueError("backward_log_gate is for causal=False (bidirectional ViG) only")
        return solve(
            gla_problem(q, k, v, log_gate, scale=scale),
            form=form,
            chunk_size=chunk_size,
            initial_state=initial_state,
            return_state=return_state,
        )
    no_state(initial_state, return_state, "bidirectional GLA sees the whole sequence")
    backward_log_gate = log_gate if backward_log_gate is None else backward_log_gate
    forward = solve(gla_problem(q, k, v, log_gate, scale=scale), form=form, chunk_size=chunk_size)
    reverse = solve(
        gla_problem(q.flip(1), k.flip(1), v.flip(1), backward_log_gate.flip(1), scale=scale),
        form=form,
        chunk_size=chunk_size,
    )
    return forward + reverse.flip(1)
