"""Split-KV decoding: a few queries against a long cache, computed piece by piece and merged.

Flash-decoding ("Flash-Decoding for long-context inference", Dao, Haziza, Massa, Sizov, 2023)
splits the keys of a decoding step into pieces that run in parallel, each returning its output
and log-sum-exp, and merges them exactly with the LSE merge (``attnkit.merge``).
LeanAttention ("Lean Attention: Hardware-Aware Scalable Attention Mechanism for the
Decode-Phase of Transformers", Sanovar et al., 2024) gives every compute unit an equal share of
the key work (stream-K); ``split_kv_attention`` cuts the keys into ``num_splits`` pieces of equal
size, the same partition. The pieces are independent (each can run on its own unit); here they
run one after the other.

With one piece this is ``attnkit.attention``; with any number it equals it up to float rounding.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from attnkit import masks
from attnkit.api import attention
from attnkit.call import Aux
from attnkit.merge import merge_all
from attnkit.scores import ScoreFunction


def split_points(num_keys: int, num_splits: int, last_at_least: int = 1) -> list[int]:
    """Boundaries ``[0, b1, ..., num_keys]`` of ``num_splits`` pieces of equal size (sizes
    differ by at most one key), with the last piece holding at least ``last_at_least`` keys
    (fewer pieces if needed)."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_splits = max(1, min(num_splits, num_keys // max(last_at_least, 1)))
    base, extra = divmod(num_keys, num_splits)
    bounds = [0]
    for i in range(num_splits):
        bounds.append(bounds[-1] + base + (1 if i >= num_splits - extra else 0))
    return bounds


def split_kv_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_splits: int = 4,
    causal: bool = False,
    score: ScoreFunction | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention of ``q [B, Tq, Hq, D]`` over ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]`` in
    ``num_splits`` key pieces merged by their log-sum-exp (flash-decoding / LeanAttention).

    Every query sees every key (decoding: the cache holds only the past and the step's own
    keys); with ``causal``, query ``i`` sees keys up to ``Tk - Tq + i`` (bottom-right aligned),
    which touches only the last piece, so the last piece is kept at least ``Tq`` keys long.
    ``score`` must be a normalised score function (softmax by default): the merge is exact
    for weights that are normalised by their sum.

    Returns ``(out [B, Tq, Hq, Dv], lse [B, Tq, Hq])`` in the input dtype / float32.
    """
    if score is not None and not score.normalized:
        raise ValueError(
            f"split_kv_attention merges normalised pieces; {score.describe()} is not normalised"
        )
    Tq, Tk = q.shape[1], k.shape[1]
    if causal and Tq > Tk:
        raise ValueError(f"causal decoding needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    bounds = split_points(Tk, num_splits, Tq if causal else 1)
    outs, lses = [], []
    for start, end in itertools.pairwise(bounds):
        last = end == Tk
        out, aux = attention(
            q,
            k[:, start:end],
            v[:, start:end],
            mask=masks.causal() if causal and last and Tq > 1 else None,
            score=score,
            scale=scale,
            backend=backend,
            aux=Aux(lse=True),
        )
        outs.append(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out)
        lses.append(aux.lse)
    out, lse = merge_all(outs, lses)
    return out.to(q.dtype), lse
