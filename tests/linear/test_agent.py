"""Agent attention (Han et al., 2024), non-causal."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import draw, qkv

import attnkit
from attnkit.linear import agent_attention, pool_agents
from attnkit.testing import check_function


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_equals_the_generalised_linear_attention_matrix(dtype) -> None:
    x = qkv(dtype=dtype)
    check_function(
        lambda **y: agent_attention(**y, num_agents=6),
        lambda **y: agent_attention(**y, num_agents=6, form="reference"),
        x,
        grads=dtype == torch.float32,
    ).assert_ok()


def test_explicit_agents_get_gradients() -> None:
    x = qkv() | {"agents": draw(2, 5, 4, 16, seed=8)}
    check_function(
        lambda **y: agent_attention(**y), lambda **y: agent_attention(**y, form="reference"), x
    ).assert_ok()


def test_pooled_agents_are_segment_means() -> None:
    q = draw(2, 12, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(pool_agents(q, 3), q.view(2, 3, 4, 3, 4).mean(2))


def test_one_agent_broadcasts_its_attention() -> None:
    """With one agent, softmax over agents is 1: every query gets softmax(a K^T) V."""
    x = qkv(dtype=torch.float64)
    a = draw(2, 1, 4, 16, dtype=torch.float64, seed=3)
    expected = attnkit.attention(a, x["k"], x["v"]).expand_as(x["q"])
    torch.testing.assert_close(agent_attention(**x, agents=a), expected)


def test_errors() -> None:
    x = qkv()
    with pytest.raises(ValueError, match="non-causal: no recurrent form"):
        agent_attention(**x, form="recurrent")
    with pytest.raises(ValueError, match=r"agents must be \[B, n, Hq, D\]"):
        agent_attention(**x, agents=draw(2, 5, 2, 16))
    with pytest.raises(ValueError, match="num_agents must be an int >= 1"):
        agent_attention(**x, num_agents=0)
