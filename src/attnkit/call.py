"""One attention call, validated: shapes, the extras requested, and the score pipeline.

``AttentionCall`` is what every backend receives. It owns the one definition of how a raw
scaled score becomes a masked log-weight (``log_weights``) and a weight (``tile_weights``; all
pairs at once: ``dense_weights``), and how a backend's normalised output becomes the final one
(``finalize``), so backends differ only in how they order work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnkit.masks.base import Mask, aligned_query_positions, row_counts
from attnkit.positional import Bias
from attnkit.primitives import accumulation_dtype, expand_kv_heads, finite_or_zero
from attnkit.scores import ScoreFunction, Softmax

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Aux:
    """Extra outputs of ``attention``, asked for with one object.

    Attributes:
        lse: the log of each row's normaliser, ``log sum_j w_ij``, ``[B, Tq, Hq]`` float32
            (the softmax log-sum-exp; ``-inf`` for a query that sees no key).
        weights: the attention weights ``[B, Hq, Tq, Tk]`` (materialised: small inputs only).
        key_sums: queries over which to sum each key's attention weight, per head — a
            ``slice`` or index tensor over ``Tq`` (e.g. ``slice(-32, None)`` for SnapKV's
            observation window, ``slice(None)`` for all). Result ``[B, Hq, Tk]`` float32,
            computed tile by tile without holding ``Tq × Tk`` in memory.
    """

    lse: bool = False
    weights: bool = False
    key_sums: slice | Tensor | None = None

    @property
    def needs_lse(self) -> bool:
        return self.lse or self.weights or self.key_sums is not None


@dataclass
class AuxOutput:
    """Extra outputs; fields not requested are None. Shapes as in ``Aux``."""

    lse: Tensor | None = None
    weights: Tensor | None = None
    key_sums: Tensor | None = None


def _describe(t: Tensor) -> str:
    return f"{t.dim()}-D tensor of shape {tuple(t.shape)}"


@dataclass
class AttentionCall:
    """A validated request. Sizes: ``B`` batch, ``Tq``/``Tk`` tokens, ``Hq``/``Hkv`` heads,
    ``D`` q/k head dim, ``Dv`` value head dim."""

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Mask | None = None
    score: ScoreFunction = field(default_factory=Softmax)
    bias: Bias | None = None
    scale: float | None = None
    aux: Aux = field(default_factory=Aux)

    def __post_init__(self) -> None:
        self._validate()
        if self.scale is None:
            self.scale = 1.0 / math.sqrt(self.D)

    # -- sizes ----------------------------------------------------------------------------
    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def Tq(self) -> int:
        return self.q.shape[1]

    @property
    def Tk(self) -> int:
        return self.k.shape[1]

    @property
    def Hq(self) -> int:
        return self.q.shape[2]

    @property
    def Hkv(self) -> int:
        return self.k.shape[2]

    @property
    def D(self) -> int:
        return self.q.shape[3]

    @property
    def Dv(self) -> int:
        return self.v.shape[3]

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 = MHA, Hq = MQA)."""
        return self.Hq // self.Hkv

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def accumulation_dtype(self) -> torch.dtype:
        """Dtype for scores, sums and the lse: float64 for float64 inputs, else float32
        (half-precision inputs accumulate in float32)."""
        return accumulation_dtype(self.dtype)

    @property
    def needs_grad(self) -> bool:
        """True if autograd will differentiate through this call."""
        if not torch.is_grad_enabled():
            return False
        tensors = [self.q, self.k, self.v, *(self.bias.parameters() if self.bias else [])]
        return any(t.requires_grad for t in tensors)

    @property
    def needs_lse(self) -> bool:
        """True if the backend must return the log-normaliser (for the score or for aux; a
        signed score's halves are merged by their lse)."""
        return self.aux.needs_lse or not self.score.normalized or self.score.signed

    # -- validation -----------------------------------------------------------------------
    def _validate(self) -> None:
        q, k, v = self.q, self.k, self.v
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(
                    f"{name} must be [B, T, H, D] (4-D), got a {_describe(t)}; "
                    "add missing dims with unsqueeze (e.g. a batch dim with .unsqueeze(0))"
                )
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(
                    f"{name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64"
                )
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(
                f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype"
            )
        if not (q.device == k.device == v.device):
            raise ValueError(
                f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); "
                "move them to one"
            )
        if not (q.shape[0] == k.shape[0] == v.shape[0]):
            raise ValueError(
                f"batch sizes differ: q has B={q.shape[0]}, k B={k.shape[0]}, v B={v.shape[0]}"
            )
        if k.shape[1] != v.shape[1]:
            raise ValueError(
                f"k has Tk={k.shape[1]} tokens but v has {v.shape[1]}; they must match"
            )
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k has {k.shape[2]} heads but v has {v.shape[2]}; they must match")
        if q.shape[3] != k.shape[3]:
            raise ValueError(
                f"q has head dim D={q.shape[3]} but k has {k.shape[3]}; q and k must share D "
                "(v may differ)"
            )
        if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
            raise ValueError(
                f"k has {k.shape[2]} heads, q has {q.shape[2]}: Hq must be a multiple of Hkv "
                "(GQA/MQA share each k/v head among Hq/Hkv query heads)"
            )
        if min(q.shape[1], k.shape[1], q.shape[3]) == 0:
            raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
        if self.mask is not None:
            if not isinstance(self.mask, Mask):
                raise TypeError(
                    f"mask must be an attnkit mask (e.g. attnkit.masks.causal()), got "
                    f"{type(self.mask).__name__}; wrap a boolean tensor with attnkit.masks"
                )
            self.mask.check(self.B, self.Hq, self.Tq, self.Tk, self.device)
        if not isinstance(self.score, ScoreFunction):
            raise TypeError(
                f"score must be an attnkit score function (e.g. attnkit.scores.sigmoid()), "
                f"got {type(self.score).__name__}"
            )
        if self.bias is not None:
            if not isinstance(self.bias, Bias):
                raise TypeError(
                    f"bias must be an attnkit bias (e.g. attnkit.positional.alibi(H)), "
                    f"got {type(self.bias).__name__}"
                )
            self.bias.check(self.Hq, self.device)
        if not isinstance(self.aux, Aux):
            raise TypeError(f"aux must be attnkit.Aux(...), got {type(self.aux).__name__}")

    # -- the score pipeline (shared by every backend) -------------------------------------
    def log_counts(self) -> Tensor | None:
        """``log(n_i)`` per query, ``[Bm, Hm, Tq]`` float32, for length-scaled scores."""
        if not self.score.needs_row_counts:
            return None
        if self.mask is None:
            counts = torch.full((1, 1, self.Tq), self.Tk, device=self.device)
        else:
            counts = row_counts(self.mask, self.Tq, self.Tk, self.device)
        return torch.log(counts.clamp_min(1).float())

    def scores(self, s: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        """What the score function weighs: scaled scores ``s = scale * q.k`` of shape
        ``[B, Hq, len(q_idx), len(k_idx)]`` plus the bias, then soft-capped."""
        if self.bias is not None:
            h = torch.arange(self.Hq, device=s.device).view(1, -1, 1, 1)
            pos = aligned_query_positions(q_idx.view(1, 1, -1, 1), self.Tq, self.Tk)
            s = s + self.bias.value(h, pos, k_idx.view(1, 1, 1, -1)).to(s.dtype)
        return self.score.cap(s)

    def log_weights(
        self,
        s: Tensor,
        q_idx: Tensor,
        k_idx: Tensor,
        apply_mask: bool = True,
        log_counts: Tensor | None = None,
    ) -> Tensor:
        """Masked log-weights for scaled scores ``s = scale * q.k`` of shape
        ``[B, Hq, len(q_idx), len(k_idx)]``; ``q_idx``/``k_idx`` are the raw query/key
        indices of the tile. Masked pairs get ``-inf``. ``log_counts`` is ``self.log_counts()``
        (pass it in to compute it once per call)."""
        q = q_idx.view(1, 1, -1, 1)
        k = k_idx.view(1, 1, 1, -1)
        s = self.scores(s, q_idx, k_idx)
        counts = None
        if self.score.needs_row_counts:
            lc = self.log_counts() if log_counts is None else log_counts
            counts = lc[..., q_idx].unsqueeze(-1).to(s.dtype)
        lw = self.score.log_weight(s, self.Tk, counts)
        if apply_mask and self.mask is not None:
            b = torch.arange(self.mask.batch_size, device=s.device).view(-1, 1, 1, 1)
            hm = torch.arange(self.mask.num_heads, device=s.device).view(1, -1, 1, 1)
            allowed = self.mask.predicate(b, hm, q, k, self.Tq, self.Tk)
            lw = lw.masked_fill(~allowed, float("-inf"))
        return lw

    def tile_weights(
        self,
        s: Tensor,
        lw: Tensor,
        lse: Tensor,
        q_idx: Tensor,
        k_idx: Tensor,
        *,
        normalize: bool = False,
    ) -> Tensor:
        """The weights ``[B, Hq, nq, nk]`` of the pairs (``q_idx`` x ``k_idx``) of a tile, from
        their scaled scores ``s`` and log-weights ``lw = self.log_weights(s, q_idx, k_idx)``
        (both ``[B, Hq, nq, nk]``) and their rows' log-normaliser over all keys ``lse``
        (``[B, Hq, nq, 1]``, ``-inf`` for a row that sees no key):

            w = exp(lw - lse)      normalised scores (softmax), or every score with ``normalize``
            w = exp(lw)            unnormalised scores (sigmoid): their weights do not sum to 1
            w = sign(score) * w    signed scores (Cog)

        0 on masked pairs and in rows that see no key. ``normalize`` gives a backend's
        row-normalised weights, whose output ``finalize`` rescales by ``exp(lse)``."""
        if normalize or self.score.normalized:
            lw = lw - finite_or_zero(lse)
        weights = torch.exp(lw)
        if self.score.signed:
            weights = weights * torch.sign(self.scores(s, q_idx, k_idx))
        return weights

    def dense_weights(
        self,
        dtype: torch.dtype,
        compose_scores: Callable[[Tensor], Tensor] | None = None,
        *,
        normalize: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Every pair's weight, computed densely in ``dtype`` (``O(Tq Tk)`` memory): weights
        ``[B, Hq, Tq, Tk]`` and each row's log-normaliser ``lse [B, Hq, Tq]`` (``-inf`` for a
        query that sees no key).

            s   = scale * q k^T          k's heads expanded for GQA
            s   = compose_scores(s)      a hook that mixes heads' scores (talking heads, DCMHA)
            lw  = log_weights(s)         bias, soft cap, score function; -inf where masked
            lse = logsumexp_j lw
            w   = tile_weights(...)      over all keys; ``normalize`` as there"""
        q = self.q.to(dtype).transpose(1, 2)  # [B, Hq, Tq, D]
        k = expand_kv_heads(self.k.to(dtype).transpose(1, 2), self.groups, dim=1)
        s = (q @ k.transpose(-1, -2)) * self.scale
        if compose_scores is not None:
            s = compose_scores(s)
        q_idx = torch.arange(self.Tq, device=self.device)
        k_idx = torch.arange(self.Tk, device=self.device)
        lw = self.log_weights(s, q_idx, k_idx)
        lse = torch.logsumexp(lw, dim=-1, keepdim=True)
        weights = self.tile_weights(s, lw, lse, q_idx, k_idx, normalize=normalize)
        return weights, lse.squeeze(-1)

    def finalize(self, out: Tensor, lse: Tensor | None) -> Tensor:
        """Turn a backend's normalised output ``[B, Tq, Hq, Dv]`` into the final one:
        unnormalised score functions are rescaled by ``exp(lse)``, since their output is
        ``sum_j w_ij v_j = exp(lse_i) * (normalised out_i)`` (``attnkit.scores``)."""
        if self.score.normalized:
            return out
        assert lse is not None, "unnormalised scores need the backend's lse"
        return out * torch.exp(lse).unsqueeze(-1).to(out.dtype)

    def passes(self) -> list[AttentionCall]:
        """The calls a backend runs for this one: the call itself, or for a signed score
        (Cog) one call per half (``score.halves()``), each asking for its lse so that
        ``attention`` can merge them."""
        if not self.score.signed:
            return [self]
        return [
            dataclasses.replace(self, score=half, aux=Aux(lse=True)) for half in self.score.halves()
        ]
