"""Aaren — "Attention as an RNN", Feng, Tung, Ahmed, Bengio, Hajimirsadeghi (2024).

Softmax attention of one query ``q`` over ``N`` tokens is a many-to-one RNN; its many-to-many
form — the attention of ``q`` over every prefix ``x_1..x_t`` — is computed by a parallel
prefix scan whose associative operator is the LSE merge. Aaren's query is a learned token (the
same for every position), not a function of the current input, which is what makes the prefix
scan possible:

    o_t = sum_(j<=t) softmax_j(scale q . k_j) v_j

It is exact: ``o_t`` equals causal softmax attention (``attnkit.attention(..., mask=causal())``)
with the query repeated at every position, which the tests check. Forms and state: see
``attnkit.linear.prefix``.
"""

from __future__ import annotations

import math

from torch import Tensor

from attnkit.linear._common import check_qkv
from attnkit.linear.prefix import PrefixState, prefix_attention

PAPER = "Attention as an RNN — Feng, Tung, Ahmed, Bengio, Hajimirsadeghi (2024)"


def aaren(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: PrefixState | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, PrefixState]:
    """Aaren: the softmax attention of one query per head over every prefix of the tokens.

    Args:
        q: the (learned) query, ``[B or 1, 1, Hq, D]`` — one token, shared by all positions.
        k, v: ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]`` (``Hq % Hkv == 0``).
        scale: ``1/sqrt(D)`` by default.
        form: ``"chunked"`` (parallel prefix scan of chunk totals with the LSE merge),
            ``"recurrent"`` (one merge per token: decoding) or ``"reference"`` (dense).
        chunk_size: tokens per chunk of the chunked form (need not divide ``T``).
        initial_state: a ``PrefixState`` (``out [B, 1, Hq, Dv]``, ``lse [B, 1, Hq]``).
        return_state: also return the final ``PrefixState``.

    Returns:
        ``out [B, T, Hq, Dv]``: row ``t`` is the attention of ``q`` over tokens ``0..t``.
    """
    check_qkv(q, k, v, same_length=False)
    if q.shape[1] != 1:
        raise ValueError(
            f"Aaren's query is one token shared by every position: q must be [B, 1, Hq, D], "
            f"got {tuple(q.shape)} (for a query per position use attnkit.attention)"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, state = prefix_attention(
        q, k, v, scale=scale, form=form, chunk_size=chunk_size, initial_state=initial_state
    )
    return (out, state) if return_state else out
