"""TinyLM: trains with any mechanism by name, and its cached generation is exact."""

from __future__ import annotations

import pytest
import torch

from attnkit import nn as ak


def tiny(mechanism: str = "causal", **attention) -> ak.TinyLM:
    torch.manual_seed(0)
    config = ak.AttentionConfig(
        d_model=32, n_heads=4, n_kv_heads=2, mechanism=mechanism, **attention
    )
    return ak.TinyLM(ak.TinyLMConfig(vocab_size=17, n_layers=2, attention=config))


@pytest.mark.parametrize("mechanism", ["causal", "sigmoid", "sliding_window"])
def test_training_steps_lower_the_loss(mechanism: str) -> None:
    model = tiny(mechanism)
    ids = torch.arange(40).remainder(5).repeat(4, 1)  # a periodic sequence: learnable
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(ids).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = model.loss(ids)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_cached_generation_equals_recomputing_the_prefix() -> None:
    model = tiny("causal", layout=("gqa", {}), gate="headwise")
    prompt = torch.randint(0, 17, (2, 9), generator=torch.Generator().manual_seed(1))
    got = model.generate(prompt, max_new_tokens=6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, ids)


def test_generate_refuses_a_negative_length() -> None:
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        tiny().generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=-1)
