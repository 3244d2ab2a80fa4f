"""FLARE — "FLARE: Fast Low-rank Attention Routing Engine", Puri, Joglekar, Ferguson,
Chen, Zhang, Kara (2025).

Per head, ``M << N`` learned latent queries ``Q_L`` gather from the ``N`` tokens, and the
tokens read the latents back, using their keys as queries — a rank-``M`` attention in
``O(N M)``:

    Z = softmax(scale Q_L K^T) V         (M x Dv)
    Y = softmax(scale K Q_L^T) Z         (N x Dv)

Its dense equivalent is ``Y = softmax(K Q_L^T) softmax(Q_L K^T) V`` (an ``N x N`` matrix of rank
``M``), the reference form. The paper uses ``scale = 1``. FLARE is an encoder mechanism
(non-causal). ``causal=True`` is its authors' decoder extension ("From Encoder to Decoder:
Extending FLARE to Memory-Efficient Causal Attention", Puri, 2026): latent ``m`` at step ``t``
attends to the prefix, ``z_(t,m) = softmax_(j<=t)(scale q_m . k_j) v_j``, and token ``t`` reads
``y_t = sum_m softmax_m(scale k_t . q_m) z_(t,m)`` — exact prefix softmaxes (``attnkit.linear
.prefix``), with an ``O(M Dv)`` recurrent state.

Keys are the readout queries, so latents and keys have the same heads (no GQA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.api import attention
from attnkit.linear._common import check_qkv, no_state, pick
from attnkit.linear.prefix import PrefixState, prefix_attention
from attnkit.primitives import accumulation_dtype

PAPER = (
    "FLARE: Fast Low-rank Attention Routing Engine — Puri, Joglekar, Ferguson, Chen, Zhang, "
    "Kara (2025); causal form: From Encoder to Decoder: Extending FLARE to Memory-Efficient "
    "Causal Attention — Puri (2026)"
)


def _reference(latents: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    acc = accumulation_dtype(k.dtype)
    u, kk, vv = (x.to(acc).expand(k.shape[0], -1, -1, -1) for x in (latents, k, v))
    gather = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", u, kk) * scale, dim=-1)
    scatter = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", kk, u) * scale, dim=-1)
    mixing = scatter @ gather  # [B, H, N, N], rank M
    return torch.einsum("bhij,bjhe->bihe", mixing, vv).to(k.dtype)


def _fast(latents: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    u = latents.expand(k.shape[0], -1, -1, -1)
    z = attention(u, k, v, scale=scale)
    return attention(k, u, z, scale=scale)


_NONCAUSAL = {"reference": _reference, "chunked": _fast}


def flare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float = 1.0,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: PrefixState | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, PrefixState]:
    """FLARE low-rank attention routing.

    Args:
        q: the ``M`` latent queries, ``[B or 1, M, H, D]`` (learned; broadcast over batch).
        k, v: ``[B, N, H, D]``, ``[B, N, H, Dv]`` (same heads as ``q``).
        causal: False: the paper's encoder form; True: the decoder form (prefix softmaxes).
        scale: score scale (1, as in the paper).
        form: ``"chunked"`` (two ``attnkit.attention`` calls; causal: the chunked prefix scan),
            ``"reference"`` (dense), ``"recurrent"`` (causal only: decoding).
        chunk_size, initial_state (``PrefixState``: ``out [B, M, H, Dv]``, ``lse [B, M, H]``),
            return_state: causal only.

    Returns:
        ``out [B, N, H, Dv]`` (and the final state).
    """
    check_qkv(q, k, v, same_length=False)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"FLARE's keys read the latents back, so latents and keys need the same heads: "
            f"q has {q.shape[2]}, k has {k.shape[2]}"
        )
    if not causal:
        no_state(initial_state, return_state, "non-causal FLARE sees the whole sequence")
        run = pick(_NONCAUSAL, form, "form of non-causal FLARE (no recurrent form)")
        return run(q, k, v, scale)
    acc = accumulation_dtype(k.dtype)
    u = q.to(acc).expand(k.shape[0], -1, -1, -1)
    readout = torch.softmax(torch.einsum("bthd,bmhd->bthm", k.to(acc), u) * scale, dim=-1)
    out, state = prefix_attention(
        q,
        k,
        v,
        scale=scale,
        readout=readout,
        form=form,
        chunk_size=chunk_size,
        initial_state=initial_state,
    )
    return (out, state) if return_state else out
