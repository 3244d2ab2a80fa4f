"""attnkit.nn.Attention: the layer equals its parts written out, caches decode exactly."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from attnkit import catalog, heads, masks, testing
from attnkit import nn as ak
from attnkit.positional import Rotary
from attnkit.positional.rotary import rotary_reference

B, T, C, H, HKV = 2, 21, 64, 4, 2


def make(**changes) -> ak.Attention:
    torch.manual_seed(0)
    fields = dict(d_model=C, n_heads=H, n_kv_heads=HKV) | changes
    return ak.Attention(ak.AttentionConfig(**fields))


def written_out(layer: ak.Attention, x, params, allowed):
    """The layer by hand: projections, RoPE, dense softmax over ``allowed``, o_proj."""
    D = layer.config.dim_per_head
    rotary = Rotary(D)
    q = (x @ params["heads.q_proj.weight"].T).unflatten(-1, (H, D))
    k = (x @ params["heads.k_proj.weight"].T).unflatten(-1, (HKV, D))
    v = (x @ params["heads.v_proj.weight"].T).unflatten(-1, (HKV, D))
    q, k = rotary_reference(rotary, q), rotary_reference(rotary, k)
    k, v = (t.repeat_interleave(H // HKV, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(2)
    return out @ params["o_proj.weight"].T


@pytest.mark.parametrize("mechanism", ["causal", "sliding_window", "softmax"])
def test_gqa_rope_layer_equals_its_parts_forward_and_backward(mechanism: str) -> None:
    layer = make(mechanism=mechanism)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    x = torch.randn(B, T, C)
    allowed = layer.attend.mask.dense(T, T) if layer.attend.mask is not None else None
    allowed = torch.ones(1, 1, T, T, dtype=torch.bool) if allowed is None else allowed

    def fast(x, **p):
        return functional_call(layer, p, (x,))

    def reference(x, **p):
        return written_out(layer, x, p, allowed)

    testing.check_function(fast, reference, {"x": x, **params}).assert_ok()


CACHE_CASES = {
    "causal_rope": dict(mechanism="causal"),
    "window_rope": dict(mechanism="sinks_window"),
    "causal_alibi": dict(mechanism="causal", positional="alibi"),
    "gated": dict(mechanism="causal", gate="elementwise"),
}


@pytest.mark.parametrize("name", CACHE_CASES)
def test_decoding_with_a_cache_equals_the_full_forward(name: str) -> None:
    layer = make(**CACHE_CASES[name])
    x = torch.randn(B, 300, C)  # longer than the 256-key window
    with torch.no_grad():
        full = layer(x)
        cache = ak.DenseCache()
        steps = [layer(x[:, :290], cache=cache)]
        steps += [layer(x[:, t : t + 1], cache=cache) for t in range(290, 300)]
    assert cache.seen(0) == 300
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_padding_mask_is_combined_with_the_mechanism() -> None:
    layer = make(mechanism="causal")
    x = torch.randn(B, T, C)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, :5] = False  # left padding of the first sequence
    with torch.no_grad():
        padded = layer(x, mask=masks.keys(keep))
        alone = layer(x[:1, 5:], positions=torch.arange(5, T))
    torch.testing.assert_close(padded[0, 5:], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "scheme", [("relative_bias", {"max_distance": 8}), ("kerple", {"kernel": "power"}), "t5"]
)
def test_learnable_positional_bias_is_a_parameter_that_trains(scheme) -> None:
    layer = make(positional=scheme)
    biases = list(layer.bias_parameters)
    assert biases and all(isinstance(p, torch.nn.Parameter) for p in biases)
    assert {id(p) for p in biases} <= {id(p) for p in layer.parameters()}
    layer(torch.randn(B, T, C)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in biases)


@pytest.mark.parametrize("layout", sorted(heads.LAYOUTS))
def test_every_layout_runs_in_the_layer_with_gradients(layout: str) -> None:
    layer = make(layout=layout, n_kv_heads=None if layout in ("mha", "mqa", "mla") else HKV)
    x = torch.randn(B, T, C, requires_grad=True)
    out = layer(x)
    assert out.shape == (B, T, C)
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0


def test_gates_add_their_parameters() -> None:
    plain = sum(p.numel() for p in make().parameters())
    head = sum(p.numel() for p in make(gate="headwise").parameters())
    element = sum(p.numel() for p in make(gate="elementwise").parameters())
    assert plain < head < element


def test_bad_choices_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown layout 'nope'; known layouts: .*gqa"):
        make(layout="nope")
    with pytest.raises(ValueError, match="unknown positional scheme 'nope'"):
        make(positional="nope")
    with pytest.raises(KeyError, match="no mechanism named 'nope'"):
        make(mechanism="nope")
    for data_dependent in ("documents", "key_padding"):
        with pytest.raises(ValueError, match="depends on the batch's data"):
            make(mechanism=data_dependent)
    assert catalog.get("rope").kind == "function"  # registered by the catalog
    with pytest.raises(ValueError, match=r"'rope' is a function \(positional\).*positional="):
        make(mechanism="rope")
    with pytest.raises(ValueError, match="use positional='relative_bias'"):
        make(mechanism="relative_bias")
    with pytest.raises(ValueError, match="take no options"):
        make(mechanism=("causal", {"window": 3}))
    with pytest.raises(ValueError, match="already has a bias"):
        make(mechanism="alibi", positional="alibi")
