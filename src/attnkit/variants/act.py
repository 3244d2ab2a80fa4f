"""ACT: training-free attention calibration that takes weight away from hidden attention sinks.

"Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without
Training through Attention Calibration" (Yu, Wang, Fu, Shi, Shaikh & Lin, ICML 2024). At
inference, in chosen heads, keys that receive far more attention than average (sinks — not
only the first token) get their weight scaled by ``beta``; the removed mass goes to the other
keys of the row in proportion to their weights, so every row still sums to 1:

    w'_ij = beta * w_ij                                  j a sink
    w'_ij = w_ij + (1 - beta) P_i * w_ij / (1 - P_i)      j not a sink,  P_i = sum_sinks w_is

A row whose visible keys are all sinks has nothing to redistribute to and is left unchanged.

What the user chooses, and how the paper chooses it (its released code,
github.com/GATECH-EIC/ACT):

- heads: offline, one (layer, head) at a time, ACT is applied to that head alone and kept if
  accuracy on a small calibration set (~900 samples) improves; the first two layers are never
  calibrated. Here ``heads`` are the query heads of one layer (``ACTConfig.heads``); run the
  search with ``calibrated_attention`` in your model.
- sinks: detected per head and input: key ``j`` is a sink when the attention it receives,
  averaged over the queries that may see it, exceeds ``threshold`` (0.1 in the paper's
  scripts; under a causal mask key ``j`` of ``T`` is seen by ``T - j`` queries). The first
  token is not calibrated (its sink helps; the released code drops the first detected index,
  which is token 0 in practice): ``keep_first``. ``sinks=`` overrides detection.
- beta: 0.4 in the paper's scripts.

Fast form. With ``o`` the plain output and ``p_is = exp(log w_is - lse_i)`` (the core's lse),
the calibrated output for sink set ``S`` and ``P_i = sum_S p_is`` is

    o'_i = (1 - beta P_i) / (1 - P_i) * (o_i - sum_S p_is v_s) + beta sum_S p_is v_s
         = (1 - beta P_i) * o_N + beta P_i * o_S

with ``o_N``/``o_S`` the normalised outputs over the non-sink/sink keys. ``calibrated_attention``
computes the second line with two calls of ``attnkit.attention`` (masks ``~S`` and ``S``, each
returning its lse; ``P_i = sigmoid(lse_S - lse_N)``), never a ``Tq × Tk`` matrix; the first line
would cancel badly when ``P_i`` is close to 1, which sink heads reach. It runs on any backend
that returns the lse, with any mask, bias and GQA, and any score whose weights sum to 1 and do
not depend on how many keys a query sees (not softplus_l1's length scaling, which the split
would change). Detection adds one call with ``Aux(key_sums=...)``.
``reference_calibrated_attention`` does the same on the dense weights.
With ``beta = 1`` (or no sink) both are plain attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.api import attention
from attnkit.call import AttentionCall, Aux
from attnkit.masks import EMPTY, FULL, PARTIAL, Mask, full
from attnkit.positional import Bias
from attnkit.primitives import expand_kv_heads
from attnkit.scores import ScoreFunction, Softmax

_QUERY_TILE = 256


@dataclass(frozen=True)
class ACTConfig:
    """What ACT calibrates in one layer (Yu et al., ICML 2024; see the module docstring).

    Attributes:
        heads: query heads to calibrate, chosen offline (the paper: keep a head if calibrating
            it alone improves accuracy on a calibration set).
        beta: factor on each sink's weight, in ``[0, 1]`` (1 = no change); paper: 0.4.
        threshold: a key is a sink when the mean weight it receives from the queries that see
            it exceeds this; paper: 0.1.
        keep_first: never calibrate key 0 (the first token's sink is kept).
    """

    heads: tuple[int, ...]
    beta: float = 0.4
    threshold: float = 0.1
    keep_first: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.heads, int):
            raise TypeError(
                f"ACTConfig.heads must be a tuple of head indices, e.g. ({self.heads},)"
            )
        heads = tuple(self.heads)
        if not heads or any(not isinstance(h, int) or h < 0 for h in heads):
            raise ValueError(
                f"ACTConfig.heads must be a non-empty tuple of head indices >= 0, "
                f"got {self.heads!r}"
            )
        object.__setattr__(self, "heads", heads)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"ACTConfig.beta must lie in [0, 1], got {self.beta}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"ACTConfig.threshold must lie in (0, 1), got {self.threshold}")

    def head_mask(self, num_heads: int, device: torch.device | str = "cpu") -> Tensor:
        """``[num_heads]`` bool, True for the calibrated heads."""
        if max(self.heads) >= num_heads:
            raise ValueError(
                f"ACTConfig.heads {self.heads} name a head >= {num_heads}, "
                "the number of query heads"
            )
        chosen = torch.zeros(num_heads, dtype=torch.bool, device=device)
        chosen[list(self.heads)] = True
        return chosen


# -- sinks ---------------------------------------------------------------------------------


def visible_query_counts(
    mask: Mask | None, Tq: int, Tk: int, device: torch.device | str = "cpu"
) -> Tensor:
    """How many queries may see each key, ``[Bm, Hm, Tk]`` (int64; ``Bm``/``Hm`` 1 where the
    mask does not depend on batch/head). Evaluated ``256`` queries at a time."""
    device = torch.device(device)
    if mask is None:
        return torch.full((1, 1, Tk), Tq, dtype=torch.long, device=device)
    Bm, Hm = mask.batch_size, mask.num_heads
    b = torch.arange(Bm, device=device).view(-1, 1, 1, 1)
    h = torch.arange(Hm, device=device).view(1, -1, 1, 1)
    k = torch.arange(Tk, device=device).view(1, 1, 1, -1)
    counts = torch.zeros(Bm, Hm, Tk, dtype=torch.long, device=device)
    for start in range(0, Tq, _QUERY_TILE):
        q = torch.arange(start, min(start + _QUERY_TILE, Tq), device=device).view(1, 1, -1, 1)
        allowed = mask.predicate(b, h, q, k, Tq, Tk)
        counts += allowed.expand(Bm, Hm, q.shape[2], Tk).sum(2)
    return counts


def find_sinks(
    key_sums: Tensor, query_counts: Tensor, *, threshold: float = 0.1, keep_first: bool = True
) -> Tensor:
    """Candidate sinks from per-key attention sums (ACT's rule, Yu et al., ICML 2024).

    Args:
        key_sums: weight each key received, summed over queries, ``[B, H, Tk]`` — e.g.
            ``attnkit.Aux(key_sums=slice(None))`` from ``attnkit.attention``.
        query_counts: how many of those queries may see each key, broadcastable to
            ``key_sums`` (``visible_query_counts``).
        threshold: sink if ``key_sums / query_counts > threshold``.
        keep_first: never mark key 0.

    Returns:
        bool ``[B, H, Tk]``.
    """
    counts = query_counts.to(key_sums.dtype)
    mean = key_sums / counts.clamp_min(1)
    sinks = (mean > threshold) & (counts > 0)
    if keep_first:
        sinks[..., 0] = False
    return sinks


def detect_sinks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    threshold: float = 0.1,
    keep_first: bool = True,
    mask: Mask | None = None,
    score: ScoreFunction | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """ACT's sinks of every head for ``q [B, Tq, Hq, D]``, ``k``/``v [B, Tk, Hkv, D|Dv]``:
    bool ``[B, Hq, Tk]``, from the per-key sums of one ``attnkit.attention`` call (never a
    ``Tq × Tk`` matrix). Arguments as in ``attnkit.attention`` and ``find_sinks``."""
    _, aux = attention(
        q,
        k,
        v,
        mask=mask,
        score=score,
        bias=bias,
        scale=scale,
        backend=backend,
        aux=Aux(key_sums=slice(None)),
    )
    counts = visible_query_counts(mask, q.shape[1], k.shape[1], q.device)
    return find_sinks(aux.key_sums, counts, threshold=threshold, keep_first=keep_first)


def _sink_set(sinks: Tensor | Sequence[int], B: int, H: int, Tk: int, device) -> Tensor:
    """``sinks`` as bool ``[B, H, Tk]``: a bool tensor broadcastable to it, or key indices
    (the same keys for every batch entry and head)."""
    sinks = torch.as_tensor(sinks, device=device)
    if sinks.dtype != torch.bool:
        if sinks.dim() != 1 or sinks.is_floating_point():
            raise ValueError(
                "sinks must be a bool tensor broadcastable to [B, Hq, Tk] or a 1-D list of key "
                f"indices, got {sinks.dtype} {tuple(sinks.shape)}"
            )
        if sinks.numel() and (sinks.min() < 0 or sinks.max() >= Tk):
            raise ValueError(f"sink key indices must lie in [0, {Tk}), got {sinks.tolist()}")
        chosen = torch.zeros(Tk, dtype=torch.bool, device=device)
        chosen[sinks.long()] = True
        sinks = chosen
    try:
        return sinks.expand(B, H, Tk).contiguous()
    except RuntimeError as error:
        raise ValueError(
            f"sinks of shape {tuple(sinks.shape)} do not broadcast to [B, Hq, Tk] = "
            f"[{B}, {H}, {Tk}]"
        ) from error


def _check_score(score: ScoreFunction | None) -> None:
    if score is not None and (score.signed or not score.normalized):
        raise ValueError(
            f"ACT moves weight within rows that sum to 1; {score.describe()} is not such a "
            "score (use softmax, softcap or softplus_l1)"
        )


# -- the dense reference ----------------------------------------------------------------------


def calibrate_weights(weights: Tensor, sinks: Tensor, beta: float) -> Tensor:
    """ACT on a weight matrix (the paper's step, dense): sink columns times ``beta``, the
    removed mass given to the other keys of each row in proportion to their weights.

    Args:
        weights: ``[B, H, Tq, Tk]``, rows summing to 1 (or 0 for empty rows).
        sinks: bool ``[B, H, Tk]``: the keys to calibrate, per batch entry and head.
        beta: factor on sink weights.

    Returns:
        ``[B, H, Tq, Tk]``; rows whose visible keys are all sinks are unchanged.
    """
    on_sink = sinks.unsqueeze(-2).to(weights.dtype)
    sink_weights = weights * on_sink
    others = weights - sink_weights
    others_sum = others.sum(-1, keepdim=True)
    removed = (1 - beta) * sink_weights.sum(-1, keepdim=True)
    has_others = others_sum > 0
    share = others / torch.where(has_others, others_sum, 1)
    calibrated = beta * sink_weights + others + removed * share
    return torch.where(has_others, calibrated, weights)


def reference_calibrated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: ACTConfig,
    *,
    sinks: Tensor | Sequence[int] | None = None,
    mask: Mask | None = None,
    score: ScoreFunction | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
) -> Tensor:
    """ACT written on the dense ``[B, Hq, Tq, Tk]`` weights: detect sinks from column means
    (unless ``sinks`` is given), calibrate the chosen heads, multiply by ``v``. Shapes and
    arguments as in ``calibrated_attention``; for tests and small inputs."""
    _check_score(score)
    call = AttentionCall(q, k, v, mask, score or Softmax(), bias, scale)
    B, Hq, Tq, Tk, G = call.B, call.Hq, call.Tq, call.Tk, call.groups
    weights, _ = call.dense_weights(q.dtype)
    vh = expand_kv_heads(v.transpose(1, 2), G, dim=1)
    if sinks is None:
        allowed = torch.ones(1, 1, Tq, Tk, dtype=torch.bool) if mask is None else mask.dense(Tq, Tk)
        counts = allowed.to(q.device).sum(-2)
        found = find_sinks(
            weights.sum(-2), counts, threshold=config.threshold, keep_first=config.keep_first
        )
    else:
        found = _sink_set(sinks, B, Hq, Tk, q.device)
    found = found & config.head_mask(Hq, q.device).view(1, -1, 1)
    out = calibrate_weights(weights, found, config.beta) @ vh
    return out.transpose(1, 2)


# -- the fast form ------------------------------------------------------------------------------


class _HeadKeys(Mask):
    """Keys ``k`` with ``keep[b, h, k]``: a key set per batch entry and head (the sinks)."""

    def __init__(self, keep: Tensor):
        self.keep = keep
        self.name = f"sink_keys{tuple(keep.shape)}"

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    @property
    def num_heads(self) -> int:
        return self.keep.shape[1]

    def predicate(self, b, h, q, k, Tq, Tk):
        return self.keep[b, h, k] & (q >= 0)

    def tile_kinds(self, q_lo, q_hi, k_lo, k_hi, Tq, Tk):
        kept = F.pad(self.keep.long().cumsum(-1), (1, 0))  # [B, H, Tk + 1]
        lo, hi = k_lo.flatten(), k_hi.flatten()
        count = (kept[..., hi + 1] - kept[..., lo]).unsqueeze(2)  # [B, H, 1, nk]
        kinds = torch.where(count == hi - lo + 1, FULL, PARTIAL)
        return torch.where(count == 0, EMPTY, kinds)


def _combine(out_n: Tensor, lse_n: Tensor, out_s: Tensor, lse_s: Tensor, beta: float) -> Tensor:
    """``(1 - beta P) o_N + beta P o_S`` with ``P = sigmoid(lse_S - lse_N)``; a row that sees
    only sinks keeps ``o_S``, a row that sees nothing gets 0. Shapes ``[B, Tq, H, Dv]`` and
    ``[B, Tq, H]``."""
    has_n, has_s = torch.isfinite(lse_n), torch.isfinite(lse_s)
    both = has_n & has_s
    # -inf - -inf is NaN; it must not even reach sigmoid, whose backward would multiply by it
    gap = torch.where(both, lse_s - lse_n, 0.0)
    share = torch.where(both, torch.sigmoid(gap), has_s.to(lse_s.dtype))
    moved = torch.where(has_n, beta * share, share).unsqueeze(-1)
    acc = lse_n.dtype
    out = (1 - moved) * out_n.to(acc) + moved * out_s.to(acc)
    return out.to(out_n.dtype)


def calibrated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: ACTConfig,
    *,
    sinks: Tensor | Sequence[int] | None = None,
    mask: Mask | None = None,
    score: ScoreFunction | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention with ACT (Yu et al., ICML 2024) in the heads ``config.heads``.

    Args:
        q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]`` (GQA allowed).
        config: heads, ``beta``, detection ``threshold`` and ``keep_first`` (``ACTConfig``).
        sinks: the keys to calibrate instead of detecting them: bool broadcastable to
            ``[B, Hq, Tk]`` or a list of key indices (``keep_first`` does not apply).
        mask, score, bias, scale, backend: as in ``attnkit.attention``; the score must give
            weights that sum to 1 and must not depend on how many keys a query sees (softmax,
            softcap, softplus_l1 without length scaling).

    Returns:
        ``[B, Tq, Hq, Dv]``; heads not in ``config.heads`` get plain attention.

    Runs two ``attnkit.attention`` calls (the non-sink keys, the sink keys; see the module
    docstring), plus one with per-key sums when the sinks are detected. Which backends can run
    them: any that returns the lse (on the CPU: chunked and reference).
    """
    _check_score(score)
    if score is not None and score.needs_row_counts:
        raise ValueError(
            f"{score.describe()} scales scores by the number of keys each query sees, which the "
            "split into sink and non-sink keys would change; use "
            "scores.softplus_l1(length_scale=False) or reference_calibrated_attention"
        )
    options = {"score": score, "bias": bias, "scale": scale, "backend": backend}
    B, Hq, Tk = q.shape[0], q.shape[2], k.shape[1]
    chosen = config.head_mask(Hq, q.device).view(1, -1, 1)
    if sinks is None:
        found = detect_sinks(
            q,
            k,
            v,
            threshold=config.threshold,
            keep_first=config.keep_first,
            mask=mask,
            **options,
        )
    else:
        found = _sink_set(sinks, B, Hq, Tk, q.device)
    found = found & chosen
    if config.beta == 1.0 or not found.any():
        return attention(q, k, v, mask=mask, **options)
    sink_keys = _HeadKeys(found)
    base = full() if mask is None else mask
    out_n, aux_n = attention(q, k, v, mask=base & ~sink_keys, aux=Aux(lse=True), **options)
    out_s, aux_s = attention(q, k, v, mask=base & sink_keys, aux=Aux(lse=True), **options)
    return _combine(out_n, aux_n.lse, out_s, aux_s.lse, config.beta)
