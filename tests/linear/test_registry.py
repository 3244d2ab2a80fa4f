"""``MECHANISMS``: every entry runs every form on plain q, k, v, and the forms agree."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import qkv

from attnkit import linear
from attnkit.testing import check_causality


def plain_inputs(name: str, dtype=torch.float64):
    # FLARE's keys read the latents back: one head count for q, k, v.
    return qkv(T=33, Hkv=4 if name.startswith("flare") else 2, dtype=dtype)


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
