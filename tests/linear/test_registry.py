"""``MECHANISMS``: every entry runs every form on plain q, k, v, and the forms agree."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import qkv

from attnkit import linear
from attnkit.backends import native
from attnkit.linear.chunked import recurrent_kernel_max_groups
from attnkit.testing import check_causality, check_function


def plain_inputs(name: str, dtype=torch.float64):
    # FLARE's keys read the latents back: one head count for q, k, v.
    return qkv(T=33, Hkv=2 if linear.get(name).gqa else 4, dtype=dtype)


@pytest.mark.parametrize("name", sorted(linear.MECHANISMS))
def test_entry_runs_every_form(name: str) -> None:
    mechanism = linear.MECHANISMS[name]
    assert mechanism.paper and mechanism.summary and "(20" in mechanism.paper
    x = plain_inputs(name)
    outs = [mechanism.run(**x, form=form) for form in mechanism.forms]
    assert outs[0].shape == x["q"].shape
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])
    assert mechanism.reference is not None and mechanism.chunked is not None


@pytest.mark.parametrize("name", sorted(n for n, m in linear.MECHANISMS.items() if m.causal))
def test_causal_entries_decode_and_never_see_the_future(name: str) -> None:
    mechanism = linear.MECHANISMS[name]
    assert mechanism.recurrent is not None and mechanism.state is not None
    x = plain_inputs(name)

    def fn(q, k, v):
        return mechanism.run(q, k, v)

    check_causality(fn, x["q"], x["k"], x["v"], cut=17)


def test_get_and_forms() -> None:
    with pytest.raises(KeyError, match="known: aaren"):
        linear.get("mamba")
    with pytest.raises(ValueError, match="agent_attention has no 'recurrent' form"):
        linear.get("agent_attention").form("recurrent")
    assert linear.get("agent_attention").recurrent is None


def _recurrent_kernel_here() -> bool:
    return native.load("linear_cpu") is not None


def test_fastest_form_is_the_recurrent_kernel_exactly_where_it_runs() -> None:
    recurrent = "recurrent" if _recurrent_kernel_here() else "chunked"
    gla = linear.get("gla")
    one_head = qkv(T=33, Hq=2, Hkv=2)
    assert gla.fastest_form(gla.inputs(**one_head)) == recurrent
    assert gla.fastest_form(gla.inputs(**one_head, chunk_size=16, return_state=True)) == recurrent
    grouped = qkv(T=33, Hq=4, Hkv=2)
    assert gla.fastest_form(gla.inputs(**grouped)) == recurrent
    too_many = qkv(T=9, Hq=2 * (recurrent_kernel_max_groups() + 1), Hkv=2)
    assert gla.fastest_form(gla.inputs(**too_many)) == "chunked"
    wide = qkv(T=9, Hq=2, Hkv=2, Dv=257)  # any width: a row takes as many slabs as it needs
    assert gla.fastest_form(gla.inputs(**wide)) == recurrent
    assert gla.fastest_form(gla.inputs(**qkv(T=9, Hq=2, Hkv=2, dtype=torch.float64))) == "chunked"
    trained = {name: t.requires_grad_() for name, t in qkv(T=9, Hq=2, Hkv=2).items()}
    assert gla.fastest_form(gla.inputs(**trained)) == "chunked"
    with torch.no_grad():
        assert gla.fastest_form(gla.inputs(**trained)) == recurrent
    # BASED's state also carries a softmax window; the others have no recurrent kernel.
    for name in ("based", "linear_attention_noncausal", "agent_attention"):
        mechanism = linear.get(name)
        assert mechanism.fastest_form(mechanism.inputs(**plain_inputs(name, torch.float32))) == (
            "chunked"
        )


@pytest.mark.parametrize("name", ["linear_attention", "gla", "retention"])
def test_auto_form_matches_the_reference(name: str) -> None:
    mechanism = linear.get(name)
    x = qkv(T=70, Hq=2, Hkv=2)
    check_function(
        lambda q, k, v: mechanism.run(q, k, v, form="auto"),
        lambda q, k, v: mechanism.run(q, k, v, form="reference"),
        x,
        grads=False,
    )


@pytest.mark.parametrize("name", sorted(linear.MECHANISMS))
def test_a_layer_learns_every_tensor_the_example_extras_supply(name: str) -> None:
    """A record's ``learned`` module stands in for its seeded ``extras`` inside a layer: it must
    produce every tensor they do, with the same shape (a record that forgets ``learned`` fails)."""
    mechanism = linear.get(name)
    x = plain_inputs(name, dtype=torch.float32)
    example = {
        key: value
        for key, value in mechanism.extras(x["q"], x["k"], x["v"]).items()
        if isinstance(value, torch.Tensor)
    }
    if mechanism.learned is None:
        assert example == {}
        return
    Hq, Hkv, D = x["q"].shape[2], x["k"].shape[2], x["q"].shape[3]
    learned = mechanism.learned(Hq, Hkv, D)(x["q"], x["k"])
    assert set(example) <= set(learned)
    for key, value in example.items():
        assert learned[key].shape[1:] == value.shape[1:], key


def test_own_queries_are_the_mechanisms_that_take_any_number_of_queries() -> None:
    own = {name for name, m in linear.MECHANISMS.items() if m.own_queries}
    assert own == {"aaren", "agent_attention", "flare", "flare_causal"}
    for name in sorted(own):  # their queries replace or pool q: a shorter q runs
        x = plain_inputs(name)
        out = linear.get(name).run(x["q"][:, :5], x["k"], x["v"], form="reference")
        assert torch.isfinite(out).all()
