"""A FlexAttention ``score_mod`` that adds a term of the positions, as a bias.

``score_mod(score, b, h, q_idx, kv_idx) = score + f(h, q_idx, kv_idx)`` (attention-gym's ALiBi,
Sandwich, relative tables) is ``attnkit``'s additive bias ``f``: ``positional.from_score_mod``
wraps it so that it runs on every backend that takes a bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.positional.bias import Bias
from attnkit.scores import PROBE_POSITIONS, ScoreMod, evaluate_score_mod, probe_points


class ScoreModBias(Bias):
    """``bias(h, q_pos, k_pos) = fn(0, 0, h, q_pos, k_pos)`` for a score_mod ``fn`` that adds a
    term of ``(h, q_idx, kv_idx)`` to the score. Query positions are bottom-right aligned like
    every attnkit bias: ``q_idx`` itself when ``Tq == Tk``."""

    def __init__(self, fn: ScoreMod, heads: int, name: str):
        self.fn, self.heads, self.name = fn, heads, name

    @property
    def num_heads(self) -> int:
        return self.heads

    def value(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        zero = torch.zeros((), device=h.device)
        return self.fn(zero, torch.zeros_like(h), h, q_pos, k_pos)


def from_score_mod(fn: ScoreMod, num_heads: int, name: str | None = None) -> Bias:
    """The bias ``f`` of a FlexAttention ``score_mod`` that returns ``score + f(h, q_idx,
    kv_idx)`` for ``num_heads`` heads (``h`` runs over ``0..num_heads-1``).

    Checked by evaluating ``fn`` at sampled points (positions below
    ``attnkit.scores.PROBE_POSITIONS``): it must add to the score (not scale or transform it)
    and not depend on the batch index; a score_mod of the score alone is a score function
    (``attnkit.scores.from_score_mod``).
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    score, b, h, q_idx, kv_idx = probe_points(num_heads)
    zero = torch.zeros_like(b)
    term = evaluate_score_mod(fn, torch.zeros_like(score), zero, h, q_idx, kv_idx)
    added = evaluate_score_mod(fn, score, zero, h, q_idx, kv_idx) - score
    if not torch.allclose(added, term, rtol=1e-5, atol=1e-5 * (1 + score.abs().max().item())):
        raise ValueError(
            "this score_mod does not add a term of positions to the score (score_mod(s) - s "
            "varies with s at sampled points), so it is no bias; a score_mod of the score "
            "alone is a score function: attnkit.scores.from_score_mod(fn)"
        )
    if not torch.equal(evaluate_score_mod(fn, score, b, h, q_idx, kv_idx) - score, added):
        raise ValueError(
            "this score_mod depends on the batch index b; attnkit biases are functions of "
            f"(head, query position, key position): index a [B, ...] table outside the "
            f"score_mod, or evaluate it per batch entry (positions sampled below "
            f"{PROBE_POSITIONS})"
        )
    return ScoreModBias(fn, num_heads, name or getattr(fn, "__name__", "score_mod"))
