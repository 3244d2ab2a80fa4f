"""Echo/induction scores (RazorAttention) and the retrieval-head flags DuoAttention uses."""

from __future__ import annotations

import pytest
import torch

from attnkit import nn as ak
from attnkit.kv import retrieval_heads as rh


def test_repeated_random_tokens_repeat_distinct_ids() -> None:
    ids = rh.repeated_random_tokens(10, low=5, high=40, batch=2, seed=1)
    assert ids.shape == (2, 20)
    assert torch.equal(ids[:, :10], ids[:, 10:])
    assert all(len(set(row[:10].tolist())) == 10 for row in ids)
    assert int(ids.min()) >= 5 and int(ids.max()) < 40
    with pytest.raises(ValueError, match="distinct ids"):
        rh.repeated_random_tokens(10, low=0, high=5)


def test_scores_read_the_echo_and_induction_targets() -> None:
    n, T = 6, 13  # one leading token, then 2 x 6
    weights = torch.zeros(1, 3, T, T)
    for i in range(T):
        weights[0, 2, i, 0] = 1.0  # a sink head
        if i >= 1 + n:
            weights[0, 0, i, i - n] = 1.0  # echo: the previous occurrence
            weights[0, 1, i, i - n + 1] = 1.0  # induction: the token after it
    scores = rh.scores_from_weights([weights, weights.flip(1)], n)
    assert scores.echo.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert scores.induction.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="no attention weights"):
        rh.scores_from_weights([], n)


def test_top_heads_pick_kv_heads_by_their_best_query_head() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.5, 0.0, 0.0, 0.05]])  # [layers, Hq]
    flags = rh.top_heads(scores, fraction=0.5, groups=2)  # 4 KV heads, keep 2
    assert flags.tolist() == [[True, False], [True, False]]
    assert rh.top_heads(scores, 0.0, groups=2).sum() == 0
    assert rh.top_heads(scores, 0.01, groups=2).sum() == 1  # at least one
    combined = rh.razor_retrieval_heads(
        rh.HeadScores(echo=scores.flip(1), induction=scores), induction=0.25, echo=0.25, groups=2
    )
    assert combined.tolist() == [[True, True], [False, False]]
    with pytest.raises(ValueError, match="multiple of groups"):
        rh.top_heads(scores, 0.5, groups=3)


def test_head_scores_on_an_attnkit_model() -> None:
    torch.manual_seed(0)
    config = ak.AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2)
    model = ak.TinyLM(ak.TinyLMConfig(vocab_size=80, n_layers=3, attention=config))
    scores = rh.head_scores(model, length=16, low=0)
    assert scores.echo.shape == scores.induction.shape == (3, 4)
    assert ((scores.echo >= 0) & (scores.echo <= 1)).all()
    assert isinstance(model.blocks[0].attn.attend, ak.Attend)  # the recorder is removed
    assert type(model.blocks[0].attn.attend) is ak.Attend
