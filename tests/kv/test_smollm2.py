"""attnkit.kv on the pretrained SmolLM2-135M (loaded once for the module, ~20 s)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from attnkit import data, kv
from attnkit.integrations import models
from attnkit.kv import evaluate, hf
from attnkit.kv import retrieval_heads as rh

PROMPTS = ["The quick brown fox jumps over the lazy dog because", "To be or not"]


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tokenizer = models.smollm2()
    except ModuleNotFoundError as error:
        pytest.skip(str(error))
    yield model, tokenizer
    model.set_attn_implementation("sdpa")


def generate(model, tokenizer, cache=None):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.generate(
            **batch,
            past_key_values=cache,
            max_new_tokens=5,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )


def test_every_policy_with_an_unlimited_budget_generates_like_the_full_cache(smollm2) -> None:
    model, tokenizer = smollm2
    model.set_attn_implementation("sdpa")
    want = generate(model, tokenizer)
    hf.prepare(model)
    layers = model.config.num_hidden_layers
    policies = [
        kv.FullCache(),
        kv.StreamingLLM(10**6),
        kv.H2O(10**6),
        kv.SnapKV(10**6, window=4),
        kv.pyramid_kv(10**6, layers, window=4),
        kv.DuoAttention(torch.zeros(layers, 3, dtype=torch.bool), recent=10**6),
    ]
    for policy in policies:
        got = generate(model, tokenizer, hf.KVCacheHF(policy, model.config))
        assert torch.equal(got.sequences, want.sequences), policy.name
        for a, b in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_streaming_llm_needs_its_sinks(smollm2) -> None:
    """StreamingLLM's finding (Xiao et al., 2024): with 4 sink tokens + a 64-token window,
    perplexity on a ~600-token passage stays close to the full cache's; the same window
    without sinks collapses. Measured here (chunks of 64 tokens, each seeing the cache and
    itself): full 44.9, sinks + window 48.1, window only 400."""
    model, tokenizer = smollm2
    ids = tokenizer(data.passage("hamlet", 400, 60), return_tensors="pt").input_ids[:, :600]
    full, _ = evaluate.perplexity(model, ids, None, chunk_size=64)
    streaming, cache = evaluate.perplexity(model, ids, kv.StreamingLLM(68, sinks=4), 64)
    window, _ = evaluate.perplexity(model, ids, kv.StreamingLLM(64, sinks=0), 64)
    assert streaming < 1.2 * full
    assert window > 4 * streaming
    assert cache.store.stored(0).eq(68).all()
    assert cache.store.nbytes() == 68 * 30 * 3 * 2 * 64 * 4
    assert cache.store.positions(29)[0, 0, :4].tolist() == [0, 1, 2, 3]


def test_smollm2_has_induction_heads(smollm2) -> None:
    model, _ = smollm2
    scores = rh.head_scores(model, length=48)
    assert scores.induction.shape == (30, 9)
    assert scores.induction.max() > 0.5 > 0.05 > scores.induction.median()
    flags = rh.razor_retrieval_heads(scores, groups=3)
    assert flags.shape == (30, 3) and 0 < int(flags.sum()) < 30
    assert model.config._attn_implementation != "attnkit"  # restored after the probe


def test_passkey_prompt(smollm2) -> None:
    _, tokenizer = smollm2
    ids, answer = evaluate.passkey_prompt(tokenizer, n_tokens=400, depth=0.5, key=71432)
    assert answer == "71432" and abs(ids.shape[1] - 400) < 30
    text = tokenizer.decode(ids[0])
    assert text.endswith("The pass key is") and 150 < text.index(answer) < len(text) - 150
    with pytest.raises(ValueError, match="depth"):
        evaluate.passkey_prompt(tokenizer, 400, 1.5, 1)
