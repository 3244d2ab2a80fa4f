"""SwiftFormer's efficient additive attention (Shaker et al., 2023), non-causal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from linear_helpers import draw, qkv

from attnkit.linear import efficient_additive_attention
from attnkit.testing import check_function


def inputs(dtype=torch.float32):
    x = qkv(dtype=dtype)
    return {"q": x["q"], "k": x["k"], "w": draw(4, 16, dtype=dtype, seed=5)}


@pytest.mark.parametrize("pooling", ["l2", "softmax"])
def test_pooled_query_equals_the_rank_one_matrix(pooling: str) -> None:
    check_function(
        lambda **y: efficient_additive_attention(**y, pooling=pooling),
        lambda **y: efficient_additive_attention(**y, pooling=pooling, form="reference"),
        inputs(),
    ).assert_ok()


def test_authors_formula() -> None:
    """The authors' code, one head at a time: normalise, score, l2-normalise over tokens,
    pool, multiply by the normalised key (query head h reads key head h // 2)."""
    x = {n: t.double() for n, t in inputs().items()}
    out = efficient_additive_attention(**x)
    for h in range(4):
        query = F.normalize(x["q"][:, :, h], dim=-1)
        key = F.normalize(x["k"][:, :, h // 2], dim=-1)
        A = F.normalize(query @ x["w"][h].unsqueeze(-1) * 16**-0.5, dim=1)
        G = (A * query).sum(1, keepdim=True)
        torch.testing.assert_close(out[:, :, h], G * key)


def test_bfloat16_forward() -> None:
    check_function(
        lambda **y: efficient_additive_attention(**y),
        lambda **y: efficient_additive_attention(**y, form="reference"),
        inputs(torch.bfloat16),
        grads=False,
    ).assert_ok()


def test_errors() -> None:
    x = inputs()
    with pytest.raises(ValueError, match=r"w must be \[Hq, D\]"):
        efficient_additive_attention(x["q"], x["k"], x["w"][:2])
    with pytest.raises(ValueError, match="unknown pooling 'mean'"):
        efficient_additive_attention(**x, pooling="mean")
    with pytest.raises(ValueError, match="non-causal: no recurrent form"):
        efficient_additive_attention(**x, form="recurrent")
