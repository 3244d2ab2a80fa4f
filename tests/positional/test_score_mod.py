"""FlexAttention score_mods as attnkit scores and biases (``scores.from_score_mod``,
``positional.from_score_mod``): attention-gym's and hand-written score_mods against a dense
float64 evaluation of FlexAttention's definition, forward and backward, and the errors for
score_mods that are neither."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import masks, positional, scores, testing

gym = pytest.importorskip("attn_gym.mods")


def flex_definition(q, k, v, score_mod, mask=None):
    """``softmax(score_mod(scale * q.k))`` over allowed keys, densely: FlexAttention's
    definition, in the inputs' dtype (float64 for the golden)."""
    B, T, H, D = q.shape
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    b = torch.arange(B).view(-1, 1, 1, 1)
    h = torch.arange(H).view(1, -1, 1, 1)
    i = torch.arange(T).view(1, 1, -1, 1)
    j = torch.arange(T).view(1, 1, 1, -1)
    s = score_mod(s, b, h, i, j).to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask.dense(T, T), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def relative_table_mod(table):
    def mod(score, b, h, q_idx, kv_idx):
        return score + table[h, (kv_idx - q_idx).clamp(-7, 7) + 7]

    return mod


def inputs(T=40, H=4, D=16):
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(2, T, H, D, generator=g) for name in "qkv"}


BIASES = {
    "alibi": lambda H: gym.generate_alibi_bias(H),
    "sandwich": lambda H: gym.sandwich.generate_sandwich_bias(H, max_seq_len=64),
    "relative table": lambda H: relative_table_mod(
        torch.randn(H, 15, generator=torch.Generator().manual_seed(3))
    ),
}


@pytest.mark.parametrize("name", list(BIASES))
@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
def test_position_score_mods_are_biases(name: str, backend: str) -> None:
    fn = BIASES[name](4)
    bias = positional.from_score_mod(fn, num_heads=4)
    for mask in (None, masks.causal()):
        testing.check_function(
            lambda q, k, v, mask=mask: attnkit.attention(
                q, k, v, bias=bias, mask=mask, backend=backend
            ),
            lambda q, k, v, mask=mask: flex_definition(q, k, v, fn, mask),
            inputs(),
        ).assert_ok()


def test_a_score_mod_bias_runs_on_flex_forward() -> None:
    fn = gym.generate_alibi_bias(4)
    bias = positional.from_score_mod(fn, num_heads=4)
    testing.check_function(
        lambda q, k, v: attnkit.attention(q, k, v, bias=bias, mask=masks.causal(), backend="flex"),
        lambda q, k, v: flex_definition(q, k, v, fn, masks.causal()),
        inputs(),
        grads=False,
    ).assert_ok()


def test_alibi_score_mod_is_attnkits_alibi_on_past_keys() -> None:
    """attention-gym's ALiBi adds ``slope * (j - i)``, attnkit's ``-slope * |i - j|``: the same
    on the keys a causal query sees."""
    bias = positional.from_score_mod(gym.generate_alibi_bias(8), num_heads=8)
    past = masks.causal().dense(30, 30)[0]
    ours = positional.alibi(8).dense(30, 30)
    torch.testing.assert_close(
        bias.dense(30, 30)[past.expand(8, -1, -1)], ours[past.expand(8, -1, -1)]
    )


def tanh_cap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


SCORE_MODS = {
    "tanh soft-cap": tanh_cap,
    "gelu activation": gym.activation.generate_activation_score_mod(),
}


@pytest.mark.parametrize("name", list(SCORE_MODS))
@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
def test_score_only_score_mods_are_score_functions(name: str, backend: str) -> None:
    fn = SCORE_MODS[name]
    score = scores.from_score_mod(fn)
    testing.check_function(
        lambda q, k, v: attnkit.attention(
            q, k, v, score=score, mask=masks.causal(), backend=backend
        ),
        lambda q, k, v: flex_definition(q, k, v, fn, masks.causal()),
        inputs(),
    ).assert_ok()


def test_a_score_mod_of_both_is_refused_by_both_with_the_fix() -> None:
    def capped_alibi(score, b, h, q_idx, kv_idx):
        return 20.0 * torch.tanh((score + 0.1 * (kv_idx - q_idx)) / 20.0)

    with pytest.raises(ValueError, match=r"is a bias: use attnkit.positional.from_score_mod"):
        scores.from_score_mod(capped_alibi)
    with pytest.raises(ValueError, match=r"score alone is a score function"):
        positional.from_score_mod(capped_alibi, num_heads=2)
    with pytest.raises(ValueError, match=r"score alone is a score function"):
        positional.from_score_mod(tanh_cap, num_heads=2)


def test_other_errors_name_the_problem() -> None:
    def per_batch(score, b, h, q_idx, kv_idx):
        return score + b

    with pytest.raises(ValueError, match="depends on the batch index b"):
        positional.from_score_mod(per_batch, num_heads=2)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        positional.from_score_mod(gym.generate_alibi_bias(2), num_heads=0)

    def reduces(score, b, h, q_idx, kv_idx):
        return score.sum()

    with pytest.raises(TypeError, match="elementwise"):
        scores.from_score_mod(reduces)
