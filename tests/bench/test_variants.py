from __future__ import annotations

import json

import pytest

from attnkit.bench.variants import (
    VariantsConfig,
    default_mechanisms,
    run_variants_bench,
    write_variants,
)


def test_every_function_and_layer_mechanism_is_in_the_default_grid() -> None:
    names = default_mechanisms()
    assert {"rope", "mla", "gated_attention", "act"} <= set(names)
    assert "causal" not in names


@pytest.mark.parametrize("backward", [False, True])
def test_records_have_times_and_ratios(tmp_path, backward: bool) -> None:
    config = VariantsConfig(
        mechanisms=("rope", "transmla"), lengths=(64,), Hq=2, Hkv=1, D=16, repeats=2,
        backward=backward,
    )  # fmt: skip
    records = run_variants_bench(config)
    assert [(r.mechanism, r.kind) for r in records] == [("rope", "function"), ("transmla", "layer")]
    for r in records:
        assert r.status == "ok", r.reason
        assert r.ratio == pytest.approx(r.baseline_ms / r.median_ms)
    data = json.loads(write_variants(records, config, tmp_path).read_text())
    assert len(data["records"]) == 2 and data["config"]["backward"] is backward


def test_attention_kind_mechanisms_are_refused_with_the_right_command() -> None:
    with pytest.raises(ValueError, match="attnkit bench --mechanisms causal"):
        VariantsConfig(mechanisms=("causal",))
