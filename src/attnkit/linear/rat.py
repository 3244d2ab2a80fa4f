"""RAT — "RAT: Bridging RNN Efficiency and Attention Accuracy via Chunk-based Sequence
Modeling", Wei, Yadav, Pascanu, Gulcehre (2025).

The sequence is cut into chunks of ``L`` tokens (``chunk_size``; RAT's default 16). Inside a
chunk a gated linear recurrence, restarted at every chunk, summarises keys and values:

    k~_t = g_t * k~_(t-1) + (1 - g_t) * k_t,     v~_t = g_t^v * v~_(t-1) + (1 - g_t^v) * v_t

(elementwise forget gates in ``[0, 1]``; ``k~ = v~ = 0`` before a chunk's first token). Across
chunks, softmax attention: the query at ``t`` attends to the final summary ``(k~, v~)`` of every
earlier chunk *and* to the running summary ``(k~_t, v~_t)`` of its own chunk. In the authors'
code the two parts are computed separately and joined with the LSE merge, as here.

``chunk_size`` is part of the model here (it decides which tokens are summarised together),
not only an execution detail. With ``chunk_size=1`` and gates 0 RAT is exactly causal softmax
attention, which the tests check. The recurrent state is the running summary plus one
key/value per finished chunk (``T / L`` of them: a KV cache ``L`` times smaller).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit import masks
from attnkit.api import attention
from attnkit.call import Aux
from attnkit.linear._common import check_chunk_size, check_qkv, pick, within
from attnkit.masks.base import EMPTY, FULL, PARTIAL, Mask
from attnkit.merge import merge
from attnkit.primitives import accumulation_dtype

PAPER = (
    "RAT: Bridging RNN Efficiency and Attention Accuracy via Chunk-based Sequence Modeling — "
    "Wei, Yadav, Pascanu, Gulcehre (2025)"
)


@dataclass(frozen=True)
class RATState:
    """RAT's decoding state.

    Attributes:
        keys, values: the final summaries of the finished chunks, ``[B, n, Hkv, Dk]`` and
            ``[B, n, Hkv, Dv]`` (``n = length // chunk_size``).
        running_k, running_v: the summary of the unfinished chunk so far, ``[B, Hkv, Dk]`` and
            ``[B, Hkv, Dv]`` (zeros at a chunk boundary).
        length: tokens seen.
    """

    keys: Tensor
    values: Tensor
    running_k: Tensor
    running_v: Tensor
    length: int


class EarlierChunks(Mask):
    """Query ``i`` (absolute position ``offset + i``) sees chunk summary ``j`` when chunk ``j``
    ended before the query's chunk began: ``j < (offset + i) // chunk_size``. Positions are
    absolute, so ``Tq``/``Tk`` alignment plays no part."""

    def __init__(self, chunk_size: int, offset: int = 0):
        self.chunk_size, self.offset = chunk_size, offset
        self.name = f"earlier_chunks({chunk_size}, offset={offset})"

    def predicate(self, b, h, q, k, Tq, Tk):
        return k < (q + self.offset) // self.chunk_size

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        full = k_hi < (q_lo + self.offset) // self.chunk_size
        empty = k_lo >= (q_hi + self.offset) // self.chunk_size
        return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)


@functools.lru_cache(maxsize=64)
def _earlier_chunks(chunk_size: int, offset: int) -> EarlierChunks:
    """One mask object per (chunk size, offset): masks cache their block structures and the
    backends' plans, which a new object per call would rebuild every time (at T=32k that was
    ~10% of a RAT forward)."""
    return EarlierChunks(chunk_size, offset)


def _initial(state: RATState | None, k: Tensor, v: Tensor, C: int, acc: torch.dtype) -> RATState:
    B, _, H, Dk = k.shape
    Dv = v.shape[-1]
    if state is None:
        return RATState(
            k.new_zeros(B, 0, H, Dk, dtype=acc),
            v.new_zeros(B, 0, H, Dv, dtype=acc),
            k.new_zeros(B, H, Dk, dtype=acc),
            v.new_zeros(B, H, Dv, dtype=acc),
            0,
        )
    if not isinstance(state, RATState):
        raise TypeError(f"initial_state must be a RATState, got {type(state).__name__}")
    n = state.length // C
    expected = {
        "keys": ((B, n, H, Dk), state.keys),
        "values": ((B, n, H, Dv), state.values),
        "running_k": ((B, H, Dk), state.running_k),
        "running_v": ((B, H, Dv), state.running_v),
    }
    for name, (shape, t) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(
                f"initial_state.{name} is {tuple(t.shape)}; after {state.length} tokens with "
                f"chunk_size={C} it must be {list(shape)}"
            )
    return RATState(
        state.keys.to(acc),
        state.values.to(acc),
        state.running_k.to(acc),
        state.running_v.to(acc),
        state.length,
    )


# -- the intra-chunk recurrence ----------------------------------------------------------------


def _summaries_dense(x: Tensor, g: Tensor, running: Tensor, offset: int, C: int) -> Tensor:
    """``x~_t`` written out: ``sum_(j<=t, same chunk) (1 - g_j) prod_(s=j+1..t) g_s x_j``
    (plus the carried ``running`` summary, decayed, for tokens of the first, unfinished
    chunk). ``x, g [B, T, H, D]``, ``running [B, H, D]``."""
    T = x.shape[1]
    pos = torch.arange(T, device=x.device)
    chunk = (pos + offset) // C
    later = pos[:, None] > pos[None, :]  # [t, j]: s = t is in (j, t]
    # prod_(s=j+1..t) g_s as a cumulative product down t of "g_t where t > j, else 1".
    factors = torch.where(later[None, :, :, None, None], g.unsqueeze(2), 1.0)
    decay = torch.cumprod(factors, dim=1)  # [B, T(t), T(j), H, D]
    same = (chunk[:, None] == chunk[None, :]) & ~later.T  # same chunk and j <= t
    weights = torch.where(same[None, :, :, None, None], decay * (1 - g).unsqueeze(1), 0.0)
    out = torch.einsum("btjhd,bjhd->bthd", weights, x)
    carried = torch.where((chunk == offset // C)[None, :, None, None], torch.cumprod(g, 1), 0.0)
    return out + carried * running.unsqueeze(1)


def _summaries_scan(x: Tensor, g: Tensor, running: Tensor, offset: int, C: int) -> Tensor:
    """The same recurrence, parallel across chunks and sequential within a chunk (``C``
    steps over ``[B, N, H, D]`` tensors)."""
    B, T, H, D = x.shape
    front = offset % C
    pad = -(front + T) % C
    # Front padding (gate 1, input 0) keeps the carried summary unchanged until the first token.
    xs = F.pad(x, (0, 0, 0, 0, front, pad)).view(B, -1, C, H, D)
    gs = F.pad(g, (0, 0, 0, 0, front, pad), value=1.0).view(B, -1, C, H, D)
    carry = torch.zeros_like(xs[:, :, 0])
    carry = torch.cat([running.unsqueeze(1), carry[:, 1:]], dim=1)
    steps = []
    for s in range(C):
        carry = gs[:, :, s] * carry + (1 - gs[:, :, s]) * xs[:, :, s]
        steps.append(carry)
    return torch.stack(steps, dim=2).view(B, -1, H, D)[:, front : front + T]


def _finished(summary: Tensor, offset: int, C: int) -> Tensor:
    """Final summaries of the chunks that end within these tokens: ``[B, n, H, D]``."""
    T = summary.shape[1]
    first_end = (C - 1 - offset) % C  # index of the first token that ends a chunk
    return summary[:, first_end:T:C]


# -- the cross-chunk attention -----------------------------------------------------------------


def _attend_dense(
    q: Tensor, k_sum: Tensor, v_sum: Tensor, state: RATState, C: int, scale: float
) -> Tensor:
    """One softmax over [earlier summaries, every token's running summary], masked to the
    visible ones: the carried chunk summaries, finished chunks before the query's, and its
    own running summary."""
    T, offset, keys, values = q.shape[1], state.length, state.keys, state.values
    pos = torch.arange(T, device=q.device)
    chunk = (pos + offset) // C
    ends = (pos + offset) % C == C - 1
    visible = (pos[:, None] == pos[None, :]) | (ends[None, :] & (chunk[None, :] < chunk[:, None]))
    carried = torch.ones(T, keys.shape[1], dtype=torch.bool, device=q.device)
    allowed = torch.cat([carried, visible], dim=1)[None, None]
    all_k, all_v = torch.cat([keys, k_sum], dim=1), torch.cat([values, v_sum], dim=1)
    return attention(
        q,
        all_k.to(q.dtype),
        all_v.to(q.dtype),
        mask=masks.from_dense(allowed),
        scale=scale,
        backend="reference",
    )


def _attend_merged(
    q: Tensor, k_sum: Tensor, v_sum: Tensor, state: RATState, C: int, scale: float
) -> Tensor:
    """Attention to the finished chunks (``attnkit.attention`` with ``EarlierChunks``) and to
    the own running summary, joined by the LSE merge."""
    offset = state.length
    keys = torch.cat([state.keys, _finished(k_sum, offset, C)], dim=1)
    values = torch.cat([state.values, _finished(v_sum, offset, C)], dim=1)
    B, T, Hq, _ = q.shape
    H = k_sum.shape[2]
    acc = k_sum.dtype
    qg = q.to(acc).view(B, T, H, Hq // H, -1)
    own_lse = (torch.einsum("bthgd,bthd->bthg", qg, k_sum) * scale).reshape(B, T, Hq)
    own = v_sum.unsqueeze(3).expand(B, T, H, Hq // H, -1).reshape(B, T, Hq, -1)
    if keys.shape[1] == 0:
        return own.to(q.dtype)
    earlier, aux = attention(
        q,
        keys.to(q.dtype),
        values.to(q.dtype),
        mask=_earlier_chunks(C, offset),
        scale=scale,
        aux=Aux(lse=True),
    )
    out, _ = merge(earlier.to(acc), aux.lse.to(acc), own, own_lse)
    return out.to(q.dtype)


@dataclass(frozen=True)
class _Form:
    summaries: Callable[..., Tensor]
    attend: Callable[..., Tensor]


def _run_parallel(form: _Form) -> Callable[..., tuple[Tensor, RATState]]:
    def run(q, k, v, gk, gv, state, C, scale):
        k_sum = form.summaries(k, gk, state.running_k, state.length, C)
        v_sum = form.summaries(v, gv, state.running_v, state.length, C)
        out = form.attend(q, k_sum, v_sum, state, C, scale)
        return out, _next_state(state, k_sum, v_sum, C)

    return run


def _next_state(state: RATState, k_sum: Tensor, v_sum: Tensor, C: int) -> RATState:
    T = k_sum.shape[1]
    length = state.length + T
    open_chunk = length % C != 0
    keep = (lambda x: x[:, -1]) if open_chunk else (lambda x: torch.zeros_like(x[:, -1]))
    return RATState(
        torch.cat([state.keys, _finished(k_sum, state.length, C)], dim=1),
        torch.cat([state.values, _finished(v_sum, state.length, C)], dim=1),
        keep(k_sum),
        keep(v_sum),
        length,
    )


def _run_recurrent(q, k, v, gk, gv, state, C, scale):
    outs = []
    for t in range(q.shape[1]):
        restart = state.length % C == 0
        rk = torch.zeros_like(state.running_k) if restart else state.running_k
        rv = torch.zeros_like(state.running_v) if restart else state.running_v
        k_sum = (gk[:, t] * rk + (1 - gk[:, t]) * k[:, t]).unsqueeze(1)
        v_sum = (gv[:, t] * rv + (1 - gv[:, t]) * v[:, t]).unsqueeze(1)
        outs.append(_attend_merged(q[:, t : t + 1], k_sum, v_sum, state, C, scale))
        state = _next_state(state, k_sum, v_sum, C)
    return torch.cat(outs, dim=1), state


#: form name -> runner(q, k, v, gk, gv, state, C, scale) -> (out, state).
FORMS: dict[str, Callable[..., tuple[Tensor, RATState]]] = {
    "reference": _run_parallel(_Form(_summaries_dense, _attend_dense)),
    "chunked": _run_parallel(_Form(_summaries_scan, _attend_merged)),
    "recurrent": _run_recurrent,
}


def _check_gate(gate: Tensor, like: Tensor, what: str) -> Tensor:
    if tuple(gate.shape) != tuple(like.shape):
        raise ValueError(
            f"{what} must have the shape of its input {tuple(like.shape)}, got {tuple(gate.shape)}"
        )
    if not within(gate, 0.0, 1.0):
        raise ValueError(f"{what} values must lie in [0, 1] (forget gates, e.g. sigmoid(x))")
    return gate


def rat(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    *,
    value_gate: Tensor | None = None,
    chunk_size: int = 16,
    scale: float | None = None,
    form: str = "chunked",
    initial_state: RATState | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, RATState]:
    """RAT (Wei et al., 2025): recurrence within chunks, softmax attention across chunks.

    Args:
        q, k, v: ``[B, T, Hq, Dk]``, ``[B, T, Hkv, Dk]``, ``[B, T, Hkv, Dv]`` (GQA allowed).
        gate: forget gates of the key recurrence, ``[B, T, Hkv, Dk]`` in ``[0, 1]``.
        value_gate: forget gates of the value recurrence, ``[B, T, Hkv, Dv]`` (default:
            ``gate``, which needs ``Dv == Dk`` — the authors share one gate).
        chunk_size: tokens per chunk (RAT's ``L``; part of the model). Need not divide ``T``.
        scale: ``1/sqrt(Dk)`` by default.
        form: ``"chunked"`` (per-chunk scan + ``attnkit.attention`` over chunk summaries,
            LSE-merged with the own summary), ``"recurrent"`` (token by token: decoding) or
            ``"reference"`` (summaries and one masked softmax written out densely).
        initial_state, return_state: a ``RATState`` in and out.

    Returns:
        ``out [B, T, Hq, Dv]`` (and the state).
    """
    check_qkv(q, k, v)
    C = check_chunk_size(chunk_size)
    run = pick(FORMS, form, "form")
    if value_gate is None:
        if v.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"one shared gate needs Dv == Dk (got {v.shape[-1]} and {k.shape[-1]}); "
                "pass value_gate [B, T, Hkv, Dv]"
            )
        value_gate = gate
    gk = _check_gate(gate, k, "gate")
    gv = _check_gate(value_gate, v, "value_gate")
    acc = accumulation_dtype(q.dtype)
    state = _initial(initial_state, k, v, C, acc)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, final = run(q, k.to(acc), v.to(acc), gk.to(acc), gv.to(acc), state, C, scale)
    return (out, final) if return_state else out
