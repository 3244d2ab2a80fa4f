"""The catalog: every mechanism builds arguments attention accepts and matches the reference."""

from __future__ import annotations

import re
from functools import partial

import pytest
import torch

import attnkit
from attnkit import catalog
from attnkit.testing import check_against_reference, check_function

SPECS = {
    "self": catalog.InputSpec(B=2, Tq=48, Tk=48, Hq=4, Hkv=2, D=16),
    "cross": catalog.InputSpec(B=2, Tq=17, Tk=48, Hq=4, Hkv=2, D=16),
}


def _of_kind(kind: str) -> list[str]:
    return [name for name, m in catalog.MECHANISMS.items() if m.kind == kind]


@pytest.mark.parametrize("shape", SPECS)
@pytest.mark.parametrize("name", _of_kind("attention"))
def test_mechanism_matches_reference(name: str, shape: str) -> None:
    mechanism = catalog.get(name)
    spec = SPECS[shape]
    q, k, v = spec.make_inputs()
    backend = mechanism.backend or "reference"
    fn = partial(attnkit.attention, backend=backend)
    check_against_reference(fn, q, k, v, grads=False, **mechanism.build(spec)).assert_ok()


@pytest.mark.parametrize("shape", SPECS)
@pytest.mark.parametrize("name", _of_kind("function"))
def test_function_mechanism_matches_its_reference(name: str, shape: str) -> None:
    mechanism = catalog.get(name)
    spec = SPECS[shape]
    if spec.Tq != spec.Tk and not mechanism.cross:
        with pytest.raises(ValueError, match="self-attention"):
            mechanism.run(spec)(*spec.make_inputs())
        return
    q, k, v = spec.make_inputs()
    fast, reference = mechanism.run(spec), mechanism.reference(spec)
    report = check_function(fast, reference, {"q": q, "k": k, "v": v})
    report.assert_ok()


@pytest.mark.parametrize("name", _of_kind("layer"))
def test_layer_mechanism_maps_tokens_to_tokens_with_gradients(name: str) -> None:
    spec = SPECS["self"]
    torch.manual_seed(0)
    layer = catalog.get(name).layer(spec)
    x = torch.randn(spec.B, spec.Tq, spec.Hq * spec.D, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and out.isfinite().all()
    out.square().sum().backward()
    assert x.grad.isfinite().all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


def test_register_needs_exactly_one_kind() -> None:
    def paper(name: str) -> catalog.Mechanism:
        return catalog.Mechanism(name, "exact", "T — A (2020)", "s")

    with pytest.raises(ValueError, match="exactly one of build"):
        catalog.register(paper("nothing"))
    with pytest.raises(ValueError, match="exactly one of build"):
        catalog.register(
            catalog.Mechanism("two", "exact", "T — A (2020)", "s", build=dict, layer=dict)
        )
    with pytest.raises(ValueError, match="needs both run and reference"):
        catalog.register(catalog.Mechanism("half", "exact", "T — A (2020)", "s", run=dict))
    assert not {"nothing", "two", "half"} & set(catalog.MECHANISMS)


@pytest.mark.parametrize("name", list(catalog.MECHANISMS))
def test_entries_are_documented(name: str) -> None:
    mechanism = catalog.get(name)
    assert mechanism.family in catalog.FAMILIES
    assert re.search(r"\(\d{4}\)", mechanism.paper), "paper needs title, authors and (year)"
    assert " — " in mechanism.paper
    assert mechanism.summary


def test_issue_entries_are_present() -> None:
    expected = {
        "softmax", "causal", "sliding_window", "sinks_window", "prefix_lm", "documents",
        "key_padding", "sigmoid", "softplus_l1", "softcap", "alibi", "relative_bias",
        "memory_efficient",
    }  # fmt: skip
    assert expected <= set(catalog.MECHANISMS)


def test_sliding_window_sees_256_keys() -> None:
    spec = catalog.InputSpec(Tq=600, Tk=600)
    mask = catalog.get("sliding_window").build(spec)["mask"]
    counts = attnkit.masks.row_counts(mask, 600, 600)
    assert counts.max().item() == 256
    assert counts[0, 0, 0].item() == 1


def test_sinks_window_is_causal() -> None:
    spec = catalog.InputSpec(Tq=300, Tk=300)
    dense = catalog.get("sinks_window").build(spec)["mask"].dense(300, 300)[0, 0]
    assert not dense.triu(1).any()
    assert dense[299, :4].all() and not dense[299, 4:44].any()


def test_documents_are_deterministic_and_packed() -> None:
    spec = catalog.InputSpec(B=3, Tq=512, Tk=512)
    first = catalog.document_segments(spec)
    assert torch.equal(first, catalog.document_segments(spec))
    assert first.shape == (3, 512)
    assert (first.diff(dim=1) >= 0).all()
    assert first[:, -1].min() >= 3  # several documents per row
    assert not torch.equal(first[0], first[1])


def test_get_unknown_lists_names() -> None:
    with pytest.raises(KeyError, match="sliding_window") as error:
        catalog.get("slidng_window")
    assert "slidng_window" in str(error.value)


def test_register_rejects_duplicates_and_unknown_families() -> None:
    existing = catalog.get("causal")
    with pytest.raises(ValueError, match="already registered"):
        catalog.register(existing)
    with pytest.raises(ValueError, match="unknown family"):
        catalog.register(catalog.Mechanism("x", "no such family", "p", "s", lambda spec: {}))


def test_register_adds_a_mechanism() -> None:
    mechanism = catalog.Mechanism(
        "test_local_8", "static sparse", "test (2024)", "window of 8",
        lambda spec: {"mask": attnkit.masks.sliding_window(7)},
    )  # fmt: skip
    catalog.register(mechanism)
    try:
        assert catalog.get("test_local_8") is mechanism
        assert "reference" in catalog.backends_for(mechanism)
    finally:
        del catalog.MECHANISMS["test_local_8"]


def test_backends_for_probes_supports() -> None:
    for name, mechanism in catalog.MECHANISMS.items():
        for grad in (False, True):
            found = catalog.backends_for(mechanism, grad=grad)
            assert ("reference" in found) == (mechanism.kind == "attention"), name
    # SDPA computes softmax only.
    assert "sdpa" in catalog.backends_for(catalog.get("causal"))
    assert "sdpa" not in catalog.backends_for(catalog.get("sigmoid"))
