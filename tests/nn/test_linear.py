"""Linear/recurrent mechanisms inside attnkit.nn: chunked training, recurrent decoding."""

from __future__ import annotations

import pytest
import torch

from attnkit import linear, masks
from attnkit import nn as ak
from attnkit.backends import native

DECODERS = [n for n, m in linear.MECHANISMS.items() if m.causal and m.state is not None]
ENCODERS = [n for n, m in linear.MECHANISMS.items() if not m.causal]


def layer(mechanism, **changes) -> ak.Attention:
    torch.manual_seed(0)
    mha = isinstance(mechanism, str) and not linear.get(mechanism).gqa  # one key head per q head
    fields = dict(d_model=32, n_heads=4, n_kv_heads=None if mha else 2, mechanism=mechanism)
    return ak.Attention(ak.AttentionConfig(**(fields | changes)))


@pytest.mark.parametrize("mechanism", DECODERS)
def test_recurrent_decoding_equals_the_chunked_forward(mechanism: str) -> None:
    attention = layer(mechanism)
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        full = attention(x)
        cache = ak.DenseCache()
        steps = [attention(x[:, :29], cache=cache)]
        steps += [attention(x[:, t : t + 1], cache=cache) for t in range(29, 40)]
    assert cache.seen(0) == 40 and cache.state(0) is not None and not cache.keys
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mechanism", ["gla", "retention"])
def test_inference_runs_the_fastest_form_and_training_the_chunked_one(
    mechanism: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    attention = layer(mechanism, n_kv_heads=None)  # one query head per KV head
    forms: list[str] = []
    form = linear.LinearMechanism.form
    monkeypatch.setattr(
        linear.LinearMechanism, "form", lambda self, name: forms.append(name) or form(self, name)
    )
    x = torch.randn(2, 40, 32)
    trained = attention(x)
    with torch.no_grad():
        inferred = attention(x)
        cache = ak.DenseCache()
        prefilled = attention(x[:, :39], cache=cache)
    fast = "recurrent" if native.load("linear_cpu") is not None else "chunked"
    assert forms == ["chunked", fast, fast]
    torch.testing.assert_close(inferred, trained.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(prefilled, inferred[:, :39], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mechanism", DECODERS + ENCODERS)
def test_gradients_reach_the_learned_inputs(mechanism: str) -> None:
    attention = layer(mechanism)
    x = torch.randn(2, 24, 32, requires_grad=True)
    attention(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in attention.attend.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mechanism", ENCODERS)
def test_non_causal_mechanisms_refuse_a_cache(mechanism: str) -> None:
    with torch.no_grad(), pytest.raises(ValueError, match="not causal"):
        layer(mechanism)(torch.randn(1, 8, 32), cache=ak.DenseCache())


def test_tiny_lm_with_gla_trains_and_generates_with_its_state() -> None:
    torch.manual_seed(0)
    config = ak.AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, mechanism="gla")
    model = ak.TinyLM(ak.TinyLMConfig(vocab_size=17, n_layers=2, attention=config))
    ids = torch.arange(40).remainder(5).repeat(4, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(ids).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = model.loss(ids)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    prompt = ids[:2, :7]
    got = model.generate(prompt, max_new_tokens=5)
    expected = prompt
    with torch.no_grad():
        for _ in range(5):
            expected = torch.cat([expected, model(expected)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, expected)


def test_bad_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="no score matrix"):
        layer("gla", positional="alibi")
    with pytest.raises(ValueError, match="takes no mask"):
        layer("gla")(torch.randn(1, 8, 32), mask=masks.causal())
    with pytest.raises(ValueError, match="one key head per query head"):
        layer("flare_causal", n_kv_heads=2)
    with pytest.raises(ValueError, match="take no options"):
        layer(("gla", {"chunk_size": 8}))
