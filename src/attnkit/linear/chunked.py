"""The shared core of the state-based mechanisms: gated linear attention in three forms.

Every state-based mechanism of ``attnkit.linear`` reduces to one recurrence per key/value head
(see ``attnkit.linear.state``):

    S_t = diag(alpha_t) S_(t-1) + k_t^T v_t,        o_t = scale * q_t S_t

with ``alpha_t = exp(g_t)``, ``g_t <= 0`` a log-gate that is absent (linear attention), a scalar
per head and step (RetNet, Lightning Attention) or a vector over the key dimension (GLA). A
mechanism only prepares ``q, k, v, g`` (feature maps, gates) as a ``LinearProblem``; ``solve``
runs one of three forms, which are exact rewritings of each other:

- ``reference``: the quadratic parallel form, ``o_i = sum_(j<=i) (q_i * prod_(s=j+1..i) alpha_s)
  . k_j v_j`` written with a dense decay tensor — the form the papers write down;
- ``chunked``: tokens in chunks of ``C``; inside a chunk the masked quadratic form (the "left
  product"), across chunks the state (the "right product"), as in Lightning Attention-2 and
  GLA's chunkwise form. Cumulative log-gates are taken *within* a chunk and every exponent
  that is evaluated is <= 0, so float32 never overflows; per-dimension gates (GLA) use GLA's
  secondary chunking: sub-chunks of up to 16 tokens are compared pairwise in log space, and
  pairs across sub-chunks factor through the end of the earlier sub-chunk;
- ``recurrent``: the RNN, one token at a time with the fixed-size state (decoding).

States and sums accumulate in float32 whatever the input dtype (float64 stays float64); the
normaliser of normalised mechanisms is carried as an extra value column of ones.

The chunked form without gradients, in float32 or bfloat16 on the CPU (every causal mechanism
built on this core: linear attention with its feature map, Lightning, RetNet, GLA, BASED's
linear half with its Taylor features) runs a compiled kernel
(``attnkit/backends/csrc/linear_cpu.cpp``): the same chunk algebra with each head's state kept
in cache across its chunks, q, k, v read in place in their own dtype and the feature maps
applied per chunk, instead of the batched tensors below (whose permutes, paddings and
materialised per-chunk states cost more than the matmuls). The recurrent form, with up to
``recurrent_kernel_max_groups()`` query heads per key/value head (any Dv), runs the kernel's
token-by-token loop (``recurrent`` in the same file): with the state in cache it takes half the
flops per token of chunks of 64, and runs prefill faster than the chunked kernel, as well as
decoding. Gradients and float64 use the PyTorch forms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.backends import native
from attnkit.linear._common import check_chunk_size, check_qkv, pick, within
from attnkit.linear.features import FEATURES
from attnkit.linear.state import ChunkStates, LinearState, combine_states
from attnkit.primitives import accumulation_dtype

#: Largest sub-chunk whose pairs GLA's secondary chunking compares directly in log space.
SUBCHUNK = 16
#: Largest total log-decay within a chunk for which ``q e^b`` and ``k e^-b`` are formed
#: directly (GLA's one-matmul chunk form): factors stay within ``e^+-60`` (about 1e26), so
#: products of float32 values up to 1e6 neither overflow nor reach denormals.
SAFE_SPAN = 60.0


@dataclass(frozen=True)
class LinearProblem:
    """The inputs of the shared recurrence after a mechanism's feature maps and gates.

    Attributes:
        q: ``[B, T, Hq, Dk]`` (feature-mapped), k: ``[B, T, Hkv, Dk]``, v: ``[B, T, Hkv, Dv]``.
        log_gate: ``[B, T, Hkv, 1 or Dk]`` with values ``<= 0`` (``log alpha_t``), or None.
        scale: multiplies every ``q . k`` (and the normaliser).
        normalize: divide by ``scale * q_t . z_t + eps`` (Katharopoulos et al.'s denominator).
        eps: added to the denominator.
        causal: False for the bidirectional form (every query sees every key; no gate).
        feature_map: a name in ``attnkit.linear.features.FEATURES`` (``"taylor"``, ``"elu"``,
            ``"relu"``): ``q`` and ``k`` are then the raw inputs of that map, and ``Dk`` above
            is its output dimension (``state_dim``); None: ``q`` and ``k`` are the features.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    log_gate: Tensor | None = None
    scale: float = 1.0
    normalize: bool = False
    eps: float = 1e-6
    causal: bool = True
    feature_map: str | None = None

    def __post_init__(self) -> None:
        check_qkv(self.q, self.k, self.v)
        if self.feature_map is not None:
            pick(FEATURES, self.feature_map, "feature_map")
            if self.log_gate is not None:
                raise ValueError(
                    "a feature_map problem takes no log-gate (no mechanism combines them)"
                )
        g = self.log_gate
        if g is None:
            return
        if not self.causal:
            raise ValueError("a decay/gate needs an order: it is only defined with causal=True")
        B, T, Hkv, Dk = self.k.shape
        if g.dim() != 4 or tuple(g.shape[:3]) != (B, T, Hkv) or g.shape[3] not in (1, Dk):
            raise ValueError(
                f"log-gate must be [B, T, Hkv, 1 or Dk] = [{B}, {T}, {Hkv}, 1 or {Dk}], "
                f"got {tuple(g.shape)}"
            )
        if not g.is_floating_point():
            raise TypeError(f"log-gate must be a floating-point tensor, got {g.dtype}")
        if not within(g, -torch.finfo(g.dtype).max, 0.0):  # finite and <= 0
            raise ValueError(
                "log-gates must be finite and <= 0 (gates alpha = exp(g) in (0, 1]); "
                "use F.logsigmoid(x) for a gate sigmoid(x)"
            )

    @property
    def state_dim(self) -> int:
        """Rows of the state: the key feature dimension the forms see."""
        Dk = self.k.shape[-1]
        return Dk if self.feature_map is None else FEATURES[self.feature_map][1](Dk)


# -- the three forms of the recurrence ---------------------------------------------------------
# Shapes inside the forms: q [B, T, Hkv, G, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv],
# g [B, T, Hkv, Dg] or None, S0 [B, Hkv, Dk, Dv]; all in the accumulation dtype. Each returns
# (o [B, T, Hkv, G, Dv], S_final [B, Hkv, Dk, Dv]).

Form = Callable[..., tuple[Tensor, Tensor]]


def _reference(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, scale: float, S0: Tensor, causal: bool
) -> tuple[Tensor, Tensor]:
    T, Dk = q.shape[1], q.shape[-1]
    b = torch.zeros_like(k[..., :1]) if g is None else torch.cumsum(g, dim=1)  # log prod alpha
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    # decay[i, j] = prod_(s=j+1..i) alpha_s = exp(b_i - b_j) for the pairs j <= i.
    log_decay = b[:, :, None] - b[:, None, :]  # [B, T(i), T(j), Hkv, Dg]
    decay = torch.where(allowed[:, :, None, None], log_decay, -torch.inf).exp()
    decay = decay.expand(*decay.shape[:4], Dk)
    scores = torch.einsum("bihgd,bjhd,bijhd->bhgij", q, k, decay) * scale
    out = torch.einsum("bhgij,bjhe->bihge", scores, v)
    # The initial state decays by prod_(s<=i) alpha_s before query i reads it.
    q_from_start = q * torch.exp(b).unsqueeze(3)
    out = out + torch.einsum("bihgd,bhde->bihge", q_from_start, S0) * scale
    to_end = torch.exp(b[:, -1:] - b)  # [B, T, Hkv, Dg]: decay from token j to the end
    S = torch.exp(b[:, -1]).unsqueeze(-1) * S0 + torch.einsum("bjhd,bjhe->bhde", k * to_end, v)
    return out, S


def _recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, scale: float, S0: Tensor, causal: bool
) -> tuple[Tensor, Tensor]:
    S = S0
    outs = []
    for t in range(q.shape[1]):
        if g is not None:
            S = torch.exp(g[:, t]).unsqueeze(-1) * S
        S = S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        if causal:
            outs.append(torch.einsum("bhgd,bhde->bhge", q[:, t], S) * scale)
    if not causal:
        return torch.einsum("bthgd,bhde->bthge", q, S) * scale, S
    return torch.stack(outs, dim=1), S


def _intra_plain(q: Tensor, k: Tensor, b: Tensor | None) -> Tensor:
    """``A[i, j] = q_i . k_j`` for ``j <= i`` within each chunk: ``[B, H, N, G, C, C]``."""
    C = q.shape[-2]
    A = q @ k.unsqueeze(3).transpose(-1, -2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    return A.masked_fill(~causal, 0.0)


def _intra_scalar(q: Tensor, k: Tensor, b: Tensor) -> Tensor:
    """Scalar gates: ``A[i, j] = q_i . k_j exp(b_i - b_j)``, a ``[C, C]`` decay per head."""
    C = q.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    log_decay = b[..., :, None, 0] - b[..., None, :, 0]  # [B, H, N, C, C]
    decay = torch.where(causal, log_decay, -torch.inf).exp()
    return (q @ k.unsqueeze(3).transpose(-1, -2)) * decay.unsqueeze(3)


def _subchunk(C: int) -> int:
    return max(d for d in range(1, min(C, SUBCHUNK) + 1) if C % d == 0)


def _intra_vector(q: Tensor, k: Tensor, b: Tensor) -> Tensor:
    """Per-dimension gates (GLA): ``A[i, j] = sum_d q_id k_jd exp(b_id - b_jd)``, ``j <= i``.

    When no chunk decays by more than ``e^-SAFE_SPAN`` (the usual case: GLA's gates stay near
    1), this is one matmul of ``q e^b`` and ``k e^-b``; otherwise secondary chunking (below).
    Both are exact; the choice costs one check per call.
    """
    if bool((b[..., -1, :] >= -SAFE_SPAN).all()):
        C = q.shape[-2]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        A = (q * torch.exp(b).unsqueeze(3)) @ (k * torch.exp(-b)).unsqueeze(3).transpose(-1, -2)
        return A.masked_fill(~causal, 0.0)
    return _intra_vector_secondary(q, k, b)


def _intra_vector_secondary(q: Tensor, k: Tensor, b: Tensor) -> Tensor:
    """GLA's secondary chunking, safe for any gates.

    ``k e^-b`` overflows when a chunk decays strongly, so pairs inside a sub-chunk of ``c``
    tokens are evaluated pairwise in log space, and a pair ``(i, j)`` across sub-chunks
    ``I > J`` factors through the last position ``r`` of ``J``:
    ``exp(b_i - b_j) = exp(b_i - b_r) exp(b_r - b_j)``, both factors <= 1.
    """
    B, H, N, G, C, D = q.shape
    c = _subchunk(C)
    S = C // c
    qs, ks, bs = q.view(B, H, N, G, S, c, D), k.view(B, H, N, S, c, D), b.view(B, H, N, S, c, D)
    tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    log_pair = bs[..., :, None, :] - bs[..., None, :, :]  # [B, H, N, S, c(i), c(j), D]
    pair_decay = torch.where(tril[..., None], log_pair, -torch.inf).exp()
    diag = torch.einsum("bhngsid,bhnsijd->bhngsij", qs, ks.unsqueeze(-3) * pair_decay)

    b_end = bs[..., -1, :]  # [B, H, N, S(J), D]
    k_off = ks * torch.exp(b_end.unsqueeze(-2) - bs)
    later = (torch.arange(C, device=q.device) // c)[None, :] > torch.arange(S, device=q.device)[
        :, None
    ]  # [S(J), C(i)]: i lies in a sub-chunk after J
    log_q = b.unsqueeze(3) - b_end.unsqueeze(-2)  # [B, H, N, S(J), C(i), D]
    q_off = q.unsqueeze(4) * torch.where(later[..., None], log_q, -torch.inf).exp().unsqueeze(3)
    off = torch.einsum("bhngJid,bhnJjd->bhngiJj", q_off, k_off)  # [B, H, N, G, C, S, c]
    eye = torch.eye(S, dtype=q.dtype, device=q.device).view(S, 1, S, 1)
    A = off.reshape(B, H, N, G, S, c, S, c) + diag.unsqueeze(-2) * eye
    return A.reshape(B, H, N, G, C, C)


#: Intra-chunk score rule by gate kind: none, one gate per head ([.., 1]), one per key dim.
_INTRA: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
    "none": _intra_plain,
    "scalar": _intra_scalar,
    "vector": _intra_vector,
}


def _gate_kind(b: Tensor | None) -> str:
    return "none" if b is None else ("scalar" if b.shape[-1] == 1 else "vector")


def _chunks(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, C: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Pad ``T`` to ``N C`` (zero keys/values, gates 1: the state is unchanged) and reshape to
    ``q [B, H, N, G, C, Dk]``, ``k [B, H, N, C, Dk]``, ``v [B, H, N, C, Dv]``, and the
    within-chunk cumulative log-gate ``b [B, H, N, C, Dg]``."""
    B, T = q.shape[:2]
    pad = -T % C
    N = (T + pad) // C

    def split(x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.view(B, N, C, *x.shape[2:])

    qc = split(q).permute(0, 3, 1, 4, 2, 5)
    kc, vc = (split(x).permute(0, 3, 1, 2, 4) for x in (k, v))
    b = None if g is None else torch.cumsum(split(g).permute(0, 3, 1, 2, 4), dim=3)
    return qc, kc, vc, b


def _chunk_updates(k: Tensor, v: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Each chunk's contribution to the state from zero, ``[B, H, N, Dk, Dv]``, and the log of
    its total decay ``[B, H, N, Dg]`` (None without gates)."""
    if b is None:
        return k.transpose(-1, -2) @ v, None
    b_last = b[..., -1:, :]
    return (k * torch.exp(b_last - b)).transpose(-1, -2) @ v, b_last.squeeze(-2)


def _chunked_states(updates: Tensor, log_decay: Tensor | None, S0: Tensor) -> Tensor:
    """``[B, H, N + 1, Dk, Dv]`` states at the chunk boundaries (layout of the forms)."""
    states = combine_states(
        updates.transpose(1, 2), None if log_decay is None else log_decay.transpose(1, 2), S0
    )
    return states.transpose(1, 2)


#: Feature maps the compiled kernel applies itself, by its code for them (None: q and k are
#: the features).
KERNEL_FEATURES = {None: 0, "taylor": 1, "elu": 2, "relu": 3}
#: Input dtypes the kernel reads (it computes in float32 and writes the output in this dtype).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def recurrent_kernel_max_groups() -> int:
    """The most query heads per key/value head (GQA) the compiled recurrent form takes, as
    the kernel build itself reports it; 0 where the kernel does not load."""
    kernel = native.load("linear_cpu")
    return 0 if kernel is None else kernel.recurrent_max_groups()


def _kernel_entry(problem: LinearProblem, form: str) -> str | None:
    """The kernel function that runs ``form`` for ``problem`` (``"forward"``: chunked,
    ``"recurrent"``), or None where the PyTorch form runs."""
    if problem.feature_map not in KERNEL_FEATURES:
        return None
    if form == "chunked":
        return "forward"
    few_groups = problem.q.shape[2] // problem.k.shape[2] <= recurrent_kernel_max_groups()
    return "recurrent" if form == "recurrent" and few_groups else None


def _kernel(problem: LinearProblem, form: str):
    """The compiled kernel where it applies (see the module docstring), else None."""
    tensors = [problem.q, problem.k, problem.v]
    if problem.log_gate is not None:
        tensors.append(problem.log_gate)
    if (
        _kernel_entry(problem, form) is None
        or not problem.causal
        or {t.dtype for t in tensors[:3]} - {problem.q.dtype}
        or problem.q.dtype not in KERNEL_DTYPES
        or problem.q.device.type != "cpu"
        or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    ):
        return None
    return native.load("linear_cpu")


def recurrent_kernel_runs(problem: LinearProblem) -> bool:
    """True where ``solve(problem, form="recurrent")`` runs on the compiled kernel."""
    return _kernel(problem, "recurrent") is not None


def _chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    scale: float,
    S0: Tensor,
    causal: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    if not causal:
        S = S0 + torch.einsum("bthd,bthe->bhde", k, v)
        return torch.einsum("bthgd,bhde->bthge", q, S) * scale, S
    B, T, H, G, _ = q.shape
    qc, kc, vc, b = _chunks(q, k, v, g, chunk_size)
    A = _INTRA[_gate_kind(b)](qc, kc, b) * scale
    out = A @ vc.unsqueeze(3)  # [B, H, N, G, C, Dv]
    updates, log_decay = _chunk_updates(kc, vc, b)
    states = _chunked_states(updates, log_decay, S0)
    q_from_start = qc if b is None else qc * torch.exp(b).unsqueeze(3)
    out = out + (q_from_start @ states[:, :, :-1].unsqueeze(3)) * scale
    out = out.permute(0, 2, 4, 1, 3, 5).reshape(B, -1, H, G, out.shape[-1])[:, :T]
    return out, states[:, :, -1]


def _chunked_form(chunk_size: int) -> Form:
    def run(q, k, v, g, scale, S0, causal):
        return _chunked(q, k, v, g, scale, S0, causal, chunk_size)

    return run


#: form name -> factory(chunk_size) of the form (only ``chunked`` uses the chunk size).
FORMS: dict[str, Callable[[int], Form]] = {
    "reference": lambda chunk_size: _reference,
    "chunked": _chunked_form,
    "recurrent": lambda chunk_size: _recurrent,
}


# -- the driver ------------------------------------------------------------------------------


def _initial(problem: LinearProblem, state: LinearState | None, dtype: torch.dtype) -> Tensor:
    B, _, Hkv, _ = problem.k.shape
    Dk = problem.state_dim
    Dv = problem.v.shape[-1]
    if state is None:
        return torch.zeros(B, Hkv, Dk, Dv + problem.normalize, dtype=dtype, device=problem.k.device)
    if not isinstance(state, LinearState):
        raise TypeError(f"initial_state must be a LinearState, got {type(state).__name__}")
    if tuple(state.kv.shape) != (B, Hkv, Dk, Dv):
        raise ValueError(
            f"initial_state.kv is {tuple(state.kv.shape)}, this call needs [B, Hkv, Dk, Dv] = "
            f"{[B, Hkv, Dk, Dv]}"
        )
    if (state.z is not None) != problem.normalize:
        raise ValueError(
            "initial_state.z must be given exactly when the output is normalised "
            f"(normalize={problem.normalize}, z is {'set' if state.z is not None else 'None'})"
        )
    if state.z is not None and tuple(state.z.shape) != (B, Hkv, Dk):
        raise ValueError(f"initial_state.z is {tuple(state.z.shape)}, expected {[B, Hkv, Dk]}")
    return state.augmented().to(dtype)


def _prepared(problem: LinearProblem) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``q [B, T, Hkv, G, Dk]``, ``k``, ``v`` and the log-gate in the accumulation dtype; raw
    ``q``, ``k`` for a ``feature_map`` problem."""
    B, T, Hq, Dk = problem.q.shape
    Hkv = problem.k.shape[2]
    acc = accumulation_dtype(problem.q.dtype)
    q = problem.q.to(acc).reshape(B, T, Hkv, Hq // Hkv, Dk)
    k, v = problem.k.to(acc), problem.v.to(acc)
    g = None if problem.log_gate is None else problem.log_gate.to(acc)
    return q, k, v, g


def _expanded(problem: LinearProblem, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
    """What the PyTorch forms compute on: the feature-mapped ``q``, ``k``, and ``v`` with the
    normaliser's column of ones (its state column is the key sum ``z``)."""
    if problem.normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    if problem.feature_map is None:
        return q, k, v
    feature = FEATURES[problem.feature_map][0]
    return feature(q), feature(k), v


def solve(
    problem: LinearProblem,
    *,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: LinearState | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, LinearState]:
    """Run ``problem`` in one of the three forms (``reference``, ``chunked``, ``recurrent``).

    Returns ``out [B, T, Hq, Dv]`` in the inputs' dtype, and with ``return_state`` the final
    ``LinearState`` (after all ``T`` tokens, the initial state included).
    """
    run = pick(FORMS, form, "form")(check_chunk_size(chunk_size))
    kernel = _kernel(problem, form)
    if kernel is not None:  # q, k, v read in their own dtype (module docstring)
        B, T, Hq, Dk = problem.q.shape
        Hkv = problem.k.shape[2]
        q = problem.q.reshape(B, T, Hkv, Hq // Hkv, Dk)
        g = problem.log_gate
        gate = torch.empty(0) if g is None else g.to(torch.float32).contiguous()
        S0 = _initial(problem, initial_state, torch.float32).contiguous()
        q, k, v = (t.contiguous() for t in (q, problem.k, problem.v))
        feature = KERNEL_FEATURES[problem.feature_map]
        options = (feature, problem.normalize, problem.eps)
        if _kernel_entry(problem, form) == "forward":
            out, S = kernel.forward(q, k, v, gate, S0, problem.scale, chunk_size, *options)
        else:
            out, S = kernel.recurrent(q, k, v, gate, S0, problem.scale, *options)
    else:
        q, k, v, g = _prepared(problem)
        S0 = _initial(problem, initial_state, q.dtype)
        q, k, v = _expanded(problem, q, k, v)
        out, S = run(q, k, v, g, problem.scale, S0, problem.causal)
        if problem.normalize:
            out = out[..., :-1] / (out[..., -1:] + problem.eps)
    B, T, Hq, _ = problem.q.shape
    out = out.reshape(B, T, Hq, -1).to(problem.q.dtype)
    if return_state:
        return out, LinearState.from_augmented(S, problem.normalize)
    return out


def problem_chunk_states(
    problem: LinearProblem, *, chunk_size: int = 64, initial_state: LinearState | None = None
) -> ChunkStates:
    """The state at every chunk boundary of a causal ``problem`` (see ``ChunkStates``)."""
    if not problem.causal:
        raise ValueError("chunk states need an order: only causal mechanisms have them")
    check_chunk_size(chunk_size)
    q, k, v, g = _prepared(problem)
    S0 = _initial(problem, initial_state, q.dtype)
    q, k, v = _expanded(problem, q, k, v)
    _, kc, vc, b = _chunks(q, k, v, g, chunk_size)
    updates, log_decay = _chunk_updates(kc, vc, b)
    states = _chunked_states(updates, log_decay, S0).transpose(1, 2)
    updates = updates.transpose(1, 2)
    z = states[..., -1] if problem.normalize else None
    update_z = updates[..., -1] if problem.normalize else None
    if problem.normalize:
        states, updates = states[..., :-1], updates[..., :-1]
    return ChunkStates(
        states, z, updates, update_z, None if log_decay is None else log_decay.transpose(1, 2)
    )
