"""Softmax attention of fixed queries over a growing prefix, exact, with an O(1) state.

The core of Aaren ("Attention as an RNN") and causal FLARE. ``M`` fixed queries ``u_m`` (per
head) attend, at every step ``t``, to the keys seen so far:

    z_(t,m) = sum_(j<=t) exp(s_(j,m)) v_j / sum_(j<=t) exp(s_(j,m)),    s_(j,m) = scale u_m . k_j

and the output mixes the ``M`` prefixes with per-token weights, ``y_t = sum_m rho_(t,m) z_(t,m)``
(Aaren: ``M = 1``, ``rho = 1``). A prefix is the pair ``(z, lse)`` — the normalised output and
the log-sum-exp of its weights — and two prefixes over disjoint keys combine exactly with the
LSE merge (``attnkit.merge``), an associative operator. So:

- ``reference``: the dense masked softmax over ``j <= t`` for every ``t``;
- ``chunked``: each chunk's total ``(z, lse)`` in parallel, a parallel prefix scan of those
  totals with the LSE merge (Hillis–Steele, ``log2 N`` rounds: Aaren's scan) giving the prefix
  entering each chunk, and inside each chunk the exact weights
  ``exp(s_j - L_t)`` with ``L_t`` the running log-sum-exp (``logcumsumexp``, so every exponent
  is <= 0);
- ``recurrent``: the RNN, one LSE merge per token; the state is ``(z, lse)`` per query.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.linear._common import check_chunk_size, pick
from attnkit.merge import merge
from attnkit.primitives import accumulation_dtype


@dataclass(frozen=True)
class PrefixState:
    """The softmax prefix of ``M`` fixed queries after some tokens.

    Attributes:
        out: normalised output so far, ``[B, M, Hq, Dv]`` (float32; float64 for float64).
        lse: log-sum-exp of the weights so far, ``[B, M, Hq]`` (``-inf``: no token yet).
    """

    out: Tensor
    lse: Tensor


def prefix_scan(out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive prefix of LSE merges along the last axis of ``lse`` (``out``: the axis before
    its last): Hillis–Steele, ``ceil(log2 N)`` rounds of ``attnkit.merge``.
    ``out [..., N, Dv]``, ``lse [..., N]``."""
    shift = 1
    while shift < lse.shape[-1]:
        o, l = merge(out[..., :-shift, :], lse[..., :-shift], out[..., shift:, :], lse[..., shift:])
        out = torch.cat([out[..., :shift, :], o], dim=-2)
        lse = torch.cat([lse[..., :shift], l], dim=-1)
        shift *= 2
    return out, lse


# Shapes inside the forms: s [B, Hkv, G, M, T] scores, v [B, Hkv, T, Dv], rho [B, Hkv, G, M, T],
# (o0 [B, Hkv, G, M, Dv], l0 [B, Hkv, G, M]) the initial prefix. Each returns
# (y [B, Hkv, G, T, Dv], o_T, l_T).


def _reference(
    s: Tensor, v: Tensor, rho: Tensor, o0: Tensor, l0: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    T = s.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()
    logits = torch.where(causal, s.unsqueeze(-2), -torch.inf)  # [.., M, T(t), T(j)]
    # The initial prefix enters as one more "key" with logit l0 and value o0.
    logits = torch.cat([l0[..., None, None].expand(*l0.shape, T, 1), logits], dim=-1)
    p = torch.softmax(logits, dim=-1)
    z = p[..., :1] * o0.unsqueeze(-2) + p[..., 1:] @ v[:, :, None, None]
    y = torch.einsum("bhgmt,bhgmte->bhgte", rho, z)
    return y, z[..., -1, :], torch.logsumexp(logits[..., -1, :], dim=-1)


def _recurrent(
    s: Tensor, v: Tensor, rho: Tensor, o0: Tensor, l0: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    o, lse = o0, l0
    ys = []
    for t in range(s.shape[-1]):
        o, lse = merge(o, lse, v[:, :, None, None, t].expand_as(o), s[..., t])
        ys.append(torch.einsum("bhgm,bhgme->bhge", rho[..., t], o))
    return torch.stack(ys, dim=-2), o, lse


#: Largest ``s_j - R`` for which the in-chunk weights are formed as a product of two factors
#: (below): ``e^60`` keeps it far from float32's limits.
SAFE_SPAN = 60.0


def _mixed_weights(sc: Tensor, L: Tensor, rho: Tensor, causal: Tensor) -> Tensor:
    """``W[t, j] = sum_m rho_(t,m) exp(s_(j,m) - L_(t,m))`` for ``j <= t`` within each chunk,
    ``[.., N, C(t), C(j)]`` from ``sc``, ``L``, ``rho`` ``[.., M, N, C]``.

    With ``R_m = L_(first token of the chunk, m)``, ``exp(s_j - L_t) = exp(s_j - R)
    exp(R - L_t)``: an ``[C, M] @ [M, C]`` matmul per chunk instead of an ``[M, C, C]`` tensor
    (16 latents: 16x less memory traffic). ``R`` depends on no later token, so no output reads
    the future even by rounding; ``exp(R - L_t) <= 1`` as the running log-sum-exp only grows,
    and ``exp(s_j - R)`` is used while bounded by ``e^SAFE_SPAN``, else the exact per-pair
    form below (a score that jumps by more than 60 within a chunk).
    """
    R = L[..., :1]  # [.., M, N, 1]
    if bool((sc - R <= SAFE_SPAN).all()):
        left = rho * torch.exp(R - L)
        right = torch.exp(sc - R)
        mixed = torch.einsum("bhgmnt,bhgmnj->bhgntj", left, right)
        return mixed.masked_fill(~causal, 0.0)
    W = torch.where(causal, sc.unsqueeze(-2) - L.unsqueeze(-1), -torch.inf).exp()
    return torch.einsum("bhgmnt,bhgmntj->bhgntj", rho, W)


def _chunked(
    s: Tensor, v: Tensor, rho: Tensor, o0: Tensor, l0: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    *lead, T = s.shape
    C = chunk_size
    pad = -T % C
    N = (T + pad) // C
    # Padded keys get logit -inf: they carry no weight.
    sc = F.pad(s, (0, pad), value=-torch.inf).view(*lead, N, C)
    rc = F.pad(rho, (0, pad)).view(*lead, N, C)
    vc = F.pad(v, (0, 0, 0, pad)).view(v.shape[0], v.shape[1], N, C, v.shape[-1])
    local = torch.logcumsumexp(sc, dim=-1)  # [.., M, N, C]
    lse_chunk = local[..., -1]
    out_chunk = torch.einsum("bhgmnc,bhnce->bhgmne", torch.exp(sc - lse_chunk.unsqueeze(-1)), vc)
    # Prefix entering each chunk: scan [initial, chunk 0, ..., chunk N-1].
    outs = torch.cat([o0.unsqueeze(-2), out_chunk], dim=-2)
    lses = torch.cat([l0.unsqueeze(-1), lse_chunk], dim=-1)
    outs, lses = prefix_scan(outs, lses)
    carry_o, carry_l = outs[..., :-1, :], lses[..., :-1]  # [.., M, N, Dv], [.., M, N]
    L = torch.logaddexp(carry_l.unsqueeze(-1), local)  # [.., M, N, C(t)]: running lse
    causal = torch.ones(C, C, dtype=torch.bool, device=s.device).tril()
    carry_w = torch.exp(carry_l.unsqueeze(-1) - L)  # [.., M, N, C(t)]
    # y_t = sum_m rho_tm (carry_w carry_o + sum_j exp(s_j - L_t) v_j), contracted over m first.
    y = _mixed_weights(sc, L, rc, causal) @ vc.unsqueeze(2)
    y = y + torch.einsum("bhgmnt,bhgmne->bhgnte", rc * carry_w, carry_o)
    y = y.flatten(-3, -2)[..., :T, :]
    return y, outs[..., -1, :], lses[..., -1]


def _chunked_form(chunk_size: int) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    def run(s, v, rho, o0, l0):
        return _chunked(s, v, rho, o0, l0, chunk_size)

    return run


#: form name -> factory(chunk_size) of the form.
FORMS: dict[str, Callable[[int], Callable[..., tuple[Tensor, Tensor, Tensor]]]] = {
    "reference": lambda chunk_size: _reference,
    "chunked": _chunked_form,
    "recurrent": lambda chunk_size: _recurrent,
}


def _initial(
    state: PrefixState | None, B: int, M: int, Hq: int, Dv: int, dtype: torch.dtype, device
) -> tuple[Tensor, Tensor]:
    if state is None:
        return (
            torch.zeros(B, M, Hq, Dv, dtype=dtype, device=device),
            torch.full((B, M, Hq), -torch.inf, dtype=dtype, device=device),
        )
    if not isinstance(state, PrefixState):
        raise TypeError(f"initial_state must be a PrefixState, got {type(state).__name__}")
    if tuple(state.out.shape) != (B, M, Hq, Dv) or tuple(state.lse.shape) != (B, M, Hq):
        raise ValueError(
            f"initial_state has out {tuple(state.out.shape)}, lse {tuple(state.lse.shape)}; "
            f"this call needs out {[B, M, Hq, Dv]}, lse {[B, M, Hq]}"
        )
    return state.out.to(dtype), state.lse.to(dtype)


def prefix_attention(
    queries: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    readout: Tensor | None = None,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: PrefixState | None = None,
) -> tuple[Tensor, PrefixState]:
    """Prefix softmax attention of ``queries [B or 1, M, Hq, D]`` over ``k [B, T, Hkv, D]``,
    ``v [B, T, Hkv, Dv]`` (``Hq % Hkv == 0``), mixed over ``M`` by ``readout [B, T, Hq, M]``
    (None: ``M`` must be 1). Returns ``(y [B, T, Hq, Dv] in the input dtype, final state)``;
    inputs are assumed validated by the caller (``aaren``, ``flare``)."""
    run = pick(FORMS, form, "form")(check_chunk_size(chunk_size))
    B, T, Hkv, _ = k.shape
    M, Hq, Dv = queries.shape[1], queries.shape[2], v.shape[-1]
    if T == 0:
        raise ValueError("prefix attention needs at least one token")
    G = Hq // Hkv
    acc = accumulation_dtype(k.dtype)
    u = queries.to(acc).expand(B, -1, -1, -1).reshape(B, M, Hkv, G, -1)
    s = torch.einsum("bmhgd,bthd->bhgmt", u, k.to(acc)) * scale
    if readout is None:
        if M != 1:
            raise ValueError(f"{M} queries need a readout [B, T, Hq, M] to mix them")
        readout = torch.ones(B, T, Hq, 1, dtype=acc, device=k.device)
    rho = readout.to(acc).reshape(B, T, Hkv, G, M).permute(0, 2, 3, 4, 1)
    out0, lse0 = _initial(initial_state, B, M, Hq, Dv, acc, k.device)
    o0 = out0.reshape(B, M, Hkv, G, Dv).permute(0, 2, 3, 1, 4)
    l0 = lse0.reshape(B, M, Hkv, G).permute(0, 2, 3, 1)
    y, oT, lT = run(s, v.to(acc).transpose(1, 2), rho, o0, l0)
    y = y.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, Dv).to(k.dtype)
    state = PrefixState(
        oT.permute(0, 3, 1, 2, 4).reshape(B, M, Hq, Dv), lT.permute(0, 3, 1, 2).reshape(B, M, Hq)
    )
    return y, state
