"""The KV-cache benchmark on SmolLM2, at a size of seconds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from attnkit.bench.kv import KVBenchConfig, run_kv_bench, write_kv


def test_tiny_kv_bench_measures_every_column(tmp_path) -> None:
    config = KVBenchConfig(
        policies=("full", "streaming_llm", "snapkv"), budgets=(64,), start_line=400,
        prompt_tokens=96, decode_tokens=16, passkey_tokens=160, depths=(0.5,),
        decode_prompts=(100,), decode_budget=64,
    )  # fmt: skip
    rows = run_kv_bench(config)
    assert [(r.policy, r.budget) for r in rows] == [
        ("full", "100%"), ("streaming_llm", "64 tokens"), ("snapkv", "64 tokens")
    ]  # fmt: skip
    full, streaming, snap = rows
    for r in rows:
        assert r.status == "ok", r.reason
        assert r.perplexity > 1 and r.passkey in (0.0, 1.0) and set(r.decode_ms) == {100}
    assert full.kept_fraction == 1.0
    assert streaming.kept_fraction < 1.0 and snap.kept_fraction < 1.0
    paths = write_kv(rows, config, tmp_path)
    assert len(json.loads(paths["json"].read_text())["rows"]) == 3
    assert paths["plot"].stat().st_size > 0


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy 'lru'"):
        KVBenchConfig(policies=("lru",))
    with pytest.raises(ValueError, match=r"fractional budgets lie in \(0, 1\]"):
        KVBenchConfig(budgets=(1.5,))
