"""Score functions: how a query-key score becomes an attention weight.

Every score function here is written as a *log-weight* ``log w(s)`` plus a flag saying whether
the weights are divided by their row sum ``Z = sum_j w(s_j)``:

    normalised:    out_i = sum_j exp(log w(s_ij) - lse_i) v_j          (softmax, softplus-l1)
    unnormalised:  out_i = sum_j exp(log w(s_ij)) v_j = exp(lse_i) * (normalised out_i)

with ``lse_i = log sum_j w(s_ij)``. So any positive weight runs on a softmax kernel by feeding
it ``log w(s)`` as the score, and the unnormalised forms rescale the result by ``exp(lse)``.
Backends therefore need only ``log_weight`` and ``normalized``.

Signed weights (Cog attention, ``signed = True``) multiply each weight by ``sign(s)``:

    signed:        out_i = sum_j sign(s_ij) exp(log w(s_ij) - lse_i) v_j

No softmax kernel can produce a negative weight, so ``attnkit.attention`` runs a signed score as
two positive-weight passes, its ``halves()`` (the positive and the negative part, each with its
own lse), and merges them with the negative part's sign flipped (``attnkit.merge``). The dense
reference applies the sign directly.

The score ``s`` a score function sees is ``scale * q.k + bias``, then soft-capped
(``cap * tanh(s / cap)``) if ``softcap`` is set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ScoreFunction:
    """Base of all score functions. Subclasses override ``log_weight``.

    Attributes:
        softcap: if set, scores are soft-capped to ``(-softcap, softcap)`` before weighting.
    """

    softcap: float | None = None

    name = "score"
    #: True if weights are divided by their row sum (softmax-like).
    normalized = True
    #: True if ``log_weight`` needs the per-query number of visible keys (``row_counts``).
    needs_row_counts = False
    #: True if weights carry the score's sign, ``w = sign(s) exp(log_weight(s))`` (Cog); such
    #: a score also defines ``halves()``.
    signed = False

    def __post_init__(self) -> None:
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0, got {self.softcap}")

    def cap(self, s: Tensor) -> Tensor:
        if self.softcap is None:
            return s
        return self.softcap * torch.tanh(s / self.softcap)

    def log_weight(self, s: Tensor, Tk: int, log_counts: Tensor | None) -> Tensor:
        """``log w(s)`` for capped scores ``s``. ``log_counts`` is ``log(n_i)`` broadcastable
        to ``s`` (only for score functions with ``needs_row_counts``)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name if self.softcap is None else f"{self.name}(softcap={self.softcap:g})"


@dataclass(frozen=True)
class Softmax(ScoreFunction):
    """Softmax attention: ``w = exp(s)``, normalised (Vaswani et al., 2017)."""

    name = "softmax"

    def log_weight(self, s, Tk, log_counts):
        return s


@dataclass(frozen=True)
class Sigmoid(ScoreFunction):
    """Sigmoid attention: ``w = sigmoid(s + b)``, not normalised.

    "Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram et al., 2024):
    the bias ``b = -log(n)`` (``n`` = number of keys, ``Tk``) keeps the initial output norm in
    check; pass ``bias`` to override.
    """

    bias: float | None = None
    name = "sigmoid"
    normalized = False

    def resolved_bias(self, Tk: int) -> float:
        return -math.log(max(Tk, 1)) if self.bias is None else float(self.bias)

    def log_weight(self, s, Tk, log_counts):
        return F.logsigmoid(s + self.resolved_bias(Tk))

    def describe(self) -> str:
        extra = "" if self.bias is None else f"bias={self.bias:g}"
        cap = "" if self.softcap is None else f"softcap={self.softcap:g}"
        args = ", ".join(a for a in (extra, cap) if a)
        return f"sigmoid({args})" if args else "sigmoid"


def _log_softplus(x: Tensor) -> Tensor:
    # log(softplus(x)) without underflow: log softplus(x) = x - exp(x)/2 + ..., so below the cut
    # (where exp(x) < sqrt(tiny)) it is x to within rounding, and above it softplus(x) is still a
    # normal number of x's dtype. A fixed cut (-20) broke float16, where softplus(-15) underflows.
    tiny = torch.finfo(x.dtype).tiny
    cut = math.log(tiny) / 2
    return torch.where(x < cut, x, torch.log(F.softplus(x).clamp_min(tiny)))


@dataclass(frozen=True)
class SoftplusL1(ScoreFunction):
    """Softplus attention with l1 normalisation and length scaling (LSSA).

    "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models"
    (Gao & Spratling, 2025): ``w_ij = softplus(c_i * s_ij)``, ``out_i = sum_j w_ij v_j / sum_j
    w_ij``. With ``length_scale=True`` the factor is ``c_i = log(n_i)``, ``n_i`` the number of
    keys query ``i`` may see (the entropy-invariance scale); ``length_scale=False`` uses 1.
    The paper's inference-time re-weighting (raising weights to a power) is not included.
    """

    length_scale: bool = True
    name = "softplus_l1"

    @property
    def needs_row_counts(self) -> bool:  # type: ignore[override]
        return self.length_scale

    def log_weight(self, s, Tk, log_counts):
        if self.length_scale:
            s = s * log_counts
        return _log_softplus(s)

    def describe(self) -> str:
        args = [] if self.length_scale else ["length_scale=False"]
        if self.softcap is not None:
            args.append(f"softcap={self.softcap:g}")
        return f"softplus_l1({', '.join(args)})" if args else "softplus_l1"


@dataclass(frozen=True)
class ReLU(ScoreFunction):
    """ReLU attention: ``w = relu(s) / L``, not normalised, ``L`` the number of keys (``Tk``).

    "Replacing softmax with ReLU in Vision Transformers" (Wortsman, Lee, Gilmer, Kornblith,
    2023): softmax's row sum is replaced by a division by the sequence length, which keeps the
    output's scale as the sequence grows:

        out_i = sum_j relu(s_ij) / L * v_j       q [B, Tq, Hq, D], k [B, Tk, Hkv, D],
                                                 v [B, Tk, Hkv, Dv] -> out [B, Tq, Hq, Dv]

    As a log-weight, ``log w = log(s) - log(L)`` where ``s > 0`` and ``-inf`` elsewhere: a key
    with ``s <= 0`` weighs nothing, as if masked, and a query whose scores are all ``<= 0`` gets
    a zero output. ``L`` is every key of the call (the paper's sequence length), also under a
    mask, as sigmoid's ``-log n``.
    """

    name = "relu"
    normalized = False

    def log_weight(self, s, Tk, log_counts):
        # log(s) only where s > 0: the clamp keeps log's gradient finite on the other branch.
        tiny = torch.finfo(s.dtype).tiny
        log_s = torch.where(s > 0, torch.log(s.clamp_min(tiny)), float("-inf"))
        return log_s - math.log(max(Tk, 1))


_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Cog(ScoreFunction):
    """Cog attention: signed weights normalised by their magnitudes ("SignExp").

    "More Expressive Attention with Negative Weights" (Lv et al., 2024/2025):

        w_ij = sign(s_ij) exp(|s_ij|) / sum_k exp(|s_ik|),    out_i = sum_j w_ij v_j

    over the keys query ``i`` may see (the authors' code masks ``|s|`` with ``-inf`` before a
    softmax and multiplies by ``sign(s)``). A key with ``s = 0`` gets weight 0 but still adds
    ``exp(0) = 1`` to the normaliser; ``lse_i = log sum_k exp(|s_ik|)``. A query that sees no
    key gets 0. One head can copy (``w > 0``), delete (``w < 0``) and keep out (``w ~ 0``).

    Fast backends run it as ``halves()``: two positive-weight passes over the same keys whose
    weights ``e^|s| (1 + sign s) / 2`` and ``e^|s| (1 - sign s) / 2`` add up to ``e^|s|`` and
    differ by ``sign(s) e^|s|``, merged as ``(Z+ o+ - Z- o-) / (Z+ + Z-)``.
    """

    name = "cog"
    signed = True

    def log_weight(self, s, Tk, log_counts):
        return s.abs()

    def halves(self) -> tuple[CogPart, CogPart]:
        """The positive-score and the negative-score part, each a positive-weight score."""
        return CogPart(softcap=self.softcap, sign=1), CogPart(softcap=self.softcap, sign=-1)


@dataclass(frozen=True)
class CogPart(ScoreFunction):
    """One half of ``Cog``: ``w = e^|s| (1 + sign * sign(s)) / 2``, i.e. ``e^|s|`` on the keys
    whose score has sign ``sign``, ``1/2`` on zero scores (so the halves' normalisers add up to
    Cog's) and 0 elsewhere. Used by ``attnkit.attention``; not meant to be called directly."""

    sign: int = 1
    name = "cog_part"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sign not in (1, -1):
            raise ValueError(f"CogPart sign must be 1 or -1, got {self.sign!r}")

    def log_weight(self, s, Tk, log_counts):
        own = s * self.sign  # |s| where the score has this half's sign
        half = torch.where(own == 0, own - _LOG2, torch.full_like(own, float("-inf")))
        return torch.where(own > 0, own, half)

    def describe(self) -> str:
        part = "positive" if self.sign > 0 else "negative"
        cap = "" if self.softcap is None else f", softcap={self.softcap:g}"
        return f"cog({part} part{cap})"


def softmax(softcap: float | None = None) -> ScoreFunction:
    """Softmax attention (the default). ``softcap`` enables tanh logit capping (Gemma 2)."""
    return Softmax(softcap=softcap)


def sigmoid(bias: float | None = None, softcap: float | None = None) -> ScoreFunction:
    """Sigmoid attention with bias ``-log(Tk)`` by default. See ``Sigmoid``."""
    return Sigmoid(softcap=softcap, bias=bias)


def softplus_l1(length_scale: bool = True, softcap: float | None = None) -> ScoreFunction:
    """Softplus + l1 attention with log-length scaling (LSSA). See ``SoftplusL1``."""
    return SoftplusL1(softcap=softcap, length_scale=length_scale)


def relu(softcap: float | None = None) -> ScoreFunction:
    """ReLU attention ``relu(s) / Tk``, not normalised (Wortsman et al., 2023). See ``ReLU``."""
    return ReLU(softcap=softcap)


def cog(softcap: float | None = None) -> ScoreFunction:
    """Cog attention with signed weights ``sign(s) e^|s| / sum e^|s|`` (Lv et al., 2024/2025).
    See ``Cog``."""
    return Cog(softcap=softcap)


def softcap(cap: float) -> ScoreFunction:
    """Softmax attention with logit soft-capping ``cap * tanh(s / cap)`` (Gemma 2, Grok)."""
    return Softmax(softcap=cap)


#: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``, broadcasting.
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

#: Positions below which ``from_score_mod`` samples a score_mod (table-based score_mods, such
#: as attention-gym's Sandwich, index tables sized for their maximum length).
PROBE_POSITIONS = 64
_PROBE_POINTS = 512


def probe_points(num_heads: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sampled ``(score, b, h, q_idx, kv_idx)``, each ``[_PROBE_POINTS]``, at which the score_mod
    converters check what a score_mod depends on (fixed seed: the same points every run)."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "converting a score_mod checks it by evaluating it, which a compiled graph cannot "
            "do: convert it once outside the compiled function (e.g. in a module's __init__)"
        )
    g = torch.Generator().manual_seed(0)
    score = torch.randn(_PROBE_POINTS, generator=g) * 8
    b = torch.randint(0, 4, (_PROBE_POINTS,), generator=g)
    h = torch.randint(0, num_heads, (_PROBE_POINTS,), generator=g)
    q_idx, kv_idx = torch.randint(0, PROBE_POSITIONS, (2, _PROBE_POINTS), generator=g)
    return score, b, h, q_idx, kv_idx


def evaluate_score_mod(fn: ScoreMod, *args: Tensor) -> Tensor:
    """``fn(*args)``, checked to be a float tensor of the arguments' broadcast shape."""
    out = fn(*args)
    shape = torch.broadcast_shapes(*(a.shape for a in args))
    if not isinstance(out, Tensor) or out.shape != shape or not out.is_floating_point():
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(
            f"a score_mod must return a float tensor of its arguments' broadcast shape "
            f"{tuple(shape)} (elementwise), got {got}"
        )
    return out


@dataclass(frozen=True)
class FromScoreMod(ScoreFunction):
    """Softmax over ``fn(s)``: a FlexAttention ``score_mod`` that depends on the score alone
    (``scores.from_score_mod``). ``log w(s) = fn(s, 0, 0, 0, 0)``, normalised."""

    fn: ScoreMod | None = None
    name = "score_mod"

    def log_weight(self, s, Tk, log_counts):
        zero = torch.zeros((), dtype=torch.long, device=s.device)
        return self.fn(s, zero, zero, zero, zero).to(s.dtype)

    def describe(self) -> str:
        return f"score_mod({getattr(self.fn, '__name__', 'fn')})"


def from_score_mod(fn: ScoreMod) -> ScoreFunction:
    """A score function from a FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` that
    depends on the score alone (a logit transform such as attention-gym's tanh soft-capping or
    activation score_mods): weights ``softmax_j(fn(s_ij))``, as FlexAttention computes them.

    A score_mod that adds a term of the positions, ``score + f(h, q_idx, kv_idx)``, is a bias:
    ``attnkit.positional.from_score_mod``. What it depends on is checked by evaluating it at
    sampled points (positions below ``PROBE_POSITIONS``); ``fn`` must be elementwise and pure.
    """
    score, b, h, q_idx, kv_idx = probe_points(num_heads=8)
    zero = torch.zeros_like(b)
    at_points = evaluate_score_mod(fn, score, b, h, q_idx, kv_idx)
    at_origin = evaluate_score_mod(fn, score, zero, zero, zero, zero)
    if not torch.equal(at_points, at_origin):
        raise ValueError(
            "this score_mod depends on b, h, q_idx or kv_idx, not on the score alone; one that "
            "adds a term of positions (score + f(h, q_idx, kv_idx)) is a bias: use "
            "attnkit.positional.from_score_mod(fn, num_heads=H). One that does more (a "
            "transform of score + bias) is not one score function: pass its position term as "
            "bias= and its transform as score="
        )
    return FromScoreMod(fn=fn)
