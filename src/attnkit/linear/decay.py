"""Linear attention with a fixed per-head decay: Lightning Attention-2 and RetNet retention.

One decayed core (``attnkit.linear.chunked`` with a constant scalar log-gate), two entry points:

    o_i = scale * sum_(j<=i) lambda_h^(i-j) (q_i . k_j) v_j      S_t = lambda_h S_(t-1) + k_t^T v_t

- ``lightning_attention``: "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence
  Lengths in Large Language Models", Qin, Sun, Li, Shen, Sun, Zhong (2024). Intra-block the
  masked left product ``((Q K^T) * M) V`` with ``M_ij = lambda^(i-j)``, inter-block the right
  product with the decayed ``K^T V`` state — exactly the chunked form here. No score scale;
  the decay of head ``h`` is ``lambda_h = exp(-s_h)`` with ``s_h`` the ALiBi slopes
  (TransNormerLLM's choice).
- ``retention``: "Retentive Network: A Successor to Transformer for Large Language Models",
  Sun, Dong, Huang, Ma, Xia, Xue, Wang, Wei (2023). ``(Q K^T * D) V`` with ``D_nm =
  gamma^(n-m)``, ``gamma_h = 1 - 2^(-5-h)``, scores scaled by ``1/sqrt(D)``; its chunkwise
  recurrent representation is the chunked form. xPos rotation and the group norm are layer
  parts (apply ``attnkit.positional`` RoPE to q/k before, normalise after).

With ``decay=1`` both are plain causal linear attention with the identity feature map.
The decay lives on the key/value state, so it is given per key/value head (GQA query heads of
a group share their kv head's decay).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.linear._common import per_head
from attnkit.linear.chunked import LinearProblem, solve
from attnkit.linear.state import LinearState
from attnkit.positional import alibi_slopes

LIGHTNING_PAPER = (
    "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large "
    "Language Models — Qin, Sun, Li, Shen, Sun, Zhong (2024)"
)
RETNET_PAPER = (
    "Retentive Network: A Successor to Transformer for Large Language Models — Sun, Dong, "
    "Huang, Ma, Xia, Xue, Wang, Wei (2023)"
)


def lightning_decay(heads: int) -> Tensor:
    """TransNormerLLM's per-head decay ``exp(-s_h)``, ``s_h`` the ALiBi slopes: ``[heads]``."""
    return torch.exp(-alibi_slopes(heads).double())


def retnet_decay(heads: int) -> Tensor:
    """RetNet's per-head decay ``gamma_h = 1 - 2^(-5-h)``: ``[heads]``."""
    return 1.0 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64))


def decay_problem(q: Tensor, k: Tensor, v: Tensor, decay: Tensor, scale: float) -> LinearProblem:
    """The constant-decay recurrence: per-step log-gate ``log lambda_h`` for every token."""
    if bool((decay <= 0).any()) or bool((decay > 1).any()):
        raise ValueError(f"decays must lie in (0, 1], got {decay.tolist()}")
    B, T, Hkv, _ = k.shape
    log_gate = torch.log(decay).to(device=k.device, dtype=k.dtype)
    return LinearProblem(q, k, v, log_gate.view(1, 1, Hkv, 1).expand(B, T, Hkv, 1), scale=scale)


def lightning_problem(
    q: Tensor, k: Tensor, v: Tensor, *, decay: Tensor | float | None = None
) -> LinearProblem:
    Hkv = k.shape[2] if k.dim() == 4 else 1
    return decay_problem(q, k, v, per_head(decay, Hkv, lightning_decay(Hkv), "decay"), 1.0)


def retention_problem(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    gamma: Tensor | float | None = None,
    scale: float | None = None,
) -> LinearProblem:
    Hkv = k.shape[2] if k.dim() == 4 else 1
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return decay_problem(q, k, v, per_head(gamma, Hkv, retnet_decay(Hkv), "gamma"), scale)


def lightning_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    decay: Tensor | float | None = None,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: LinearState | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, LinearState]:
    """Lightning Attention-2 (Qin et al., 2024): causal linear attention with decay.

    ``q [B, T, Hq, D]``, ``k [B, T, Hkv, D]``, ``v [B, T, Hkv, Dv]``; ``decay``: ``lambda`` in
    ``(0, 1]``, a scalar or ``[Hkv]`` (default ``exp(-alibi_slopes(Hkv))``). ``form``,
    ``chunk_size``, ``initial_state`` (``LinearState(kv [B, Hkv, D, Dv])``) and
    ``return_state`` as in ``linear_attention``. Returns ``out [B, T, Hq, Dv]``.
    """
    return solve(
        lightning_problem(q, k, v, decay=decay),
        form=form,
        chunk_size=chunk_size,
        initial_state=initial_state,
        return_state=return_state,
    )


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    gamma: Tensor | float | None = None,
    scale: float | None = None,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: LinearState | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, LinearState]:
    """RetNet retention (Sun et al., 2023): ``(Q K^T * D) V`` with ``D_nm = gamma_h^(n-m)``.

    ``gamma``: a scalar or ``[Hkv]`` in ``(0, 1]`` (default ``1 - 2^(-5-h)``); ``scale``
    defaults to ``1/sqrt(D)``. Other arguments and shapes as in ``lightning_attention``.
    """
    return solve(
        retention_problem(q, k, v, gamma=gamma, scale=scale),
        form=form,
        chunk_size=chunk_size,
        initial_state=initial_state,
        return_state=return_state,
    )
