"""KVCache: exact decoding with every policy, per-head storage that frees memory, positions
kept after eviction, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit import kv, masks
from attnkit import nn as ak
from attnkit.nn import Attend

VOCAB, HQ, HKV, D = 53, 4, 2, 8


def tiny(mechanism=None) -> ak.TinyLM:
    torch.manual_seed(0)
    config = ak.AttentionConfig(
        d_model=32, n_heads=HQ, n_kv_heads=HKV, mechanism=mechanism or "causal"
    )
    return ak.TinyLM(ak.TinyLMConfig(vocab_size=VOCAB, n_layers=2, attention=config))


def decode(model: ak.TinyLM, prompt: torch.Tensor, steps: int, cache) -> tuple[list, torch.Tensor]:
    """Greedy decoding; returns the logits of every step and the tokens."""
    with torch.no_grad():
        logits = [model(prompt, cache)[:, -1]]
        ids = [prompt]
        for _ in range(steps):
            ids.append(logits[-1].argmax(-1, keepdim=True))
            logits.append(model(ids[-1], cache)[:, -1])
    return logits, torch.cat(ids, dim=1)


PROMPT = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
UNLIMITED = {
    "full": kv.FullCache(),
    "streaming_llm": kv.StreamingLLM(10**6),
    "h2o": kv.H2O(10**6),
    "snapkv": kv.SnapKV(10**6, window=4),
    "pyramidkv": kv.pyramid_kv(10**6, num_layers=2),
    "duo": kv.DuoAttention(torch.zeros(2, HKV, dtype=torch.bool), recent=10**6),
    "fraction 1.0": kv.StreamingLLM(1.0),
}


@pytest.mark.parametrize("name", list(UNLIMITED))
def test_unlimited_budget_equals_the_full_cache(name: str) -> None:
    model = tiny()
    want_logits, want_ids = decode(model, PROMPT, 6, ak.DenseCache())
    cache = kv.KVCache(UNLIMITED[name])
    got_logits, got_ids = decode(kv.use(model), PROMPT, 6, cache)
    assert torch.equal(got_ids, want_ids)
    for got, want in zip(got_logits[:1], want_logits[:1], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if name != "fraction 1.0":  # a fraction of the prompt evicts once generation outgrows it
        for got, want in zip(got_logits, want_logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert cache.nbytes() == cache.full_nbytes()


def test_streaming_cache_equals_the_sinks_and_window_mask() -> None:
    """Decoding token by token through StreamingLLM(sinks + w) is exactly attention with
    ``causal & (sinks | sliding_window(w))`` over the whole sequence: keys keep their
    original (rotated) positions after eviction."""
    sinks, window = 3, 6
    model = tiny()
    masked = tiny(Attend(mask=masks.causal() & (masks.sinks(sinks) | masks.sliding_window(window))))
    masked.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = masked(ids)
        cache = kv.KVCache(kv.StreamingLLM(sinks + window, sinks))
        kv.use(model)
        got = torch.cat([model(ids[:, t : t + 1], cache) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    kept = cache.positions(0)[0, 0].tolist()
    assert kept == [0, 1, 2, *range(30 - window, 30)]
    assert cache.seen(0) == 30


def naive_step(q, keys, values, allowed) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 softmax attention with a boolean mask; also the weights."""
    G = q.shape[2] // keys.shape[2]
    k = keys.double().repeat_interleave(G, dim=2)
    v = values.double().repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) / math.sqrt(q.shape[-1])
    w = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", w, v), w


@pytest.mark.parametrize(
    "policy",
    [
        kv.H2O(torch.tensor([[7, 11]]), recent=0.3),
        kv.StreamingLLM(torch.tensor([[6, 9]]), sinks=2),
        kv.SnapKV(torch.tensor([[8, 12]]), window=3, kernel=3),
        kv.DuoAttention(torch.tensor([[True, False]]), sinks=1, recent=4),
    ],
    ids=lambda p: p.name,
)
def test_attention_over_kept_keys_equals_dense_attention_and_follows_the_policy(policy) -> None:
    """Drive a cache with random q/k/v (a prompt, a 3-token chunk, single tokens). Every call
    equals dense attention over the history restricted to what the cache held plus the call's
    own keys (causal among them), and the kept sets follow the policy's reference rule applied
    to dense attention weights."""
    g = torch.Generator().manual_seed(3)
    B, G = 2, HQ // HKV
    cache = kv.KVCache(policy)
    history_k, history_v = torch.empty(B, 0, HKV, D), torch.empty(B, 0, HKV, D)
    kept = torch.zeros(B, HKV, 0, dtype=torch.bool)  # which history tokens each row holds
    scores = torch.zeros(B, HKV, 0, dtype=torch.float64)
    lengths_seen = set()
    for T in [14, 3, 1, 1, 1, 1]:
        q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (HQ, HKV, HKV))
        first = history_k.shape[1] == 0
        history_k, history_v = torch.cat([history_k, k], 1), torch.cat([history_v, v], 1)
        kept = torch.cat([kept, torch.ones(B, HKV, T, dtype=torch.bool)], -1)
        n = history_k.shape[1]
        causal = torch.ones(T, n, dtype=torch.bool).tril(n - T)
        allowed = kept.repeat_interleave(G, 1).unsqueeze(2) & causal
        want, weights = naive_step(q, history_k, history_v, allowed)
        k_all, _ = cache.update(0, k, v)
        got = cache.attend(q, k_all)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
        # the policy's reference rule on dense statistics decides what stays
        selector = policy.queries(0, T, first)
        scores = torch.cat([scores, torch.zeros(B, HKV, T, dtype=torch.float64)], -1)
        sums = None
        if selector is not None:
            sums = weights[:, :, selector].sum(2).view(B, HKV, G, n).sum(2)
            scores = scores + sums
        view = kv.StepView(
            layer=0,
            positions=torch.arange(n).expand(B, HKV, n),
            attendable=kept,
            scores=scores.float(),
            key_sums=None if sums is None else sums.float(),
            new_tokens=T,
            seen=n,
            context=14,
            first_call=first,
        )
        kept = kept & policy.reference(view)
        positions = cache.positions(0)
        for b in range(B):
            for h in range(HKV):
                row = positions[b, h]
                assert row[row >= 0].tolist() == kept[b, h].nonzero().flatten().tolist()
        lengths_seen.add(tuple(cache.stored(0).flatten().tolist()))
    assert any(len(set(lengths)) > 1 for lengths in lengths_seen), "per-head lengths must differ"


@pytest.mark.parametrize(
    "policy",
    [
        kv.SnapKV(torch.tensor([[6, 10], [5, 12]]), window=3),
        kv.H2O(torch.tensor([[6, 10], [5, 12]])),
        kv.DuoAttention(torch.tensor([[True, False], [False, True]]), sinks=2, recent=4),
    ],
    ids=lambda p: p.name,
)
def test_heads_keep_different_lengths_and_bytes_equal_kept_entries(policy) -> None:
    model = kv.use(tiny())
    cache = kv.KVCache(policy)
    decode(model, PROMPT, 5, cache)
    stored = torch.stack([cache.stored(layer) for layer in cache.layers])  # [layers, B, Hkv]
    assert (stored != stored.flatten()[0]).any(), "every head kept the same number of keys"
    per_entry = 2 * D * 4  # keys + values, float32
    assert cache.nbytes() == int(stored.sum()) * per_entry
    held = 0
    for layer in cache.layers:  # the tensors themselves hold exactly the kept entries
        keys, values, _ = cache.head(layer, 0, 0)
        held += keys.untyped_storage().nbytes() + values.untyped_storage().nbytes()
    assert held == cache.nbytes() < cache.full_nbytes()
    keys, _, positions = cache.head(1, 1, 1)
    assert keys.shape[0] == positions.shape[0] == int(cache.stored(1)[1, 1])


def test_budget_larger_than_the_context_keeps_everything() -> None:
    cache = kv.KVCache(kv.H2O(1000))
    decode(kv.use(tiny()), PROMPT, 3, cache)
    assert cache.stored(0).eq(PROMPT.shape[1] + 3).all()


def test_cache_without_cache_aware_attention_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match=r"attnkit\.kv\.use"):
        decode(tiny(), PROMPT, 1, kv.KVCache(kv.StreamingLLM(8)))


def test_bad_inputs_fail_clearly() -> None:
    model = kv.use(tiny())
    with pytest.raises(ValueError, match="model has \\? layers and 2 KV heads"):
        decode(model, PROMPT, 1, kv.KVCache(kv.DuoAttention(torch.ones(2, 3, dtype=torch.bool))))
    with pytest.raises(ValueError, match="model has 2 layers and 2 KV heads"):
        kv.KVCache(
            kv.DuoAttention(torch.ones(3, 2, dtype=torch.bool)), num_layers=2, num_kv_heads=2
        )
    with pytest.raises(ValueError, match="3 per-layer entries but the model has 2 layers"):
        kv.KVCache(kv.SnapKV([40, 40, 40], window=4), num_layers=2, num_kv_heads=2)
    with pytest.raises(ValueError, match="zero or negative budget"):
        kv.KVCache(kv.StreamingLLM(0))
    cache = kv.KVCache()
    decode(model, PROMPT, 1, cache)
    with pytest.raises(ValueError, match="new cache for a new batch"):
        decode(model, PROMPT[:1], 1, cache)
    windowed = kv.use(tiny("sliding_window"))
    with pytest.raises(ValueError, match="Express windows and sinks"):
        decode(windowed, PROMPT, 1, kv.KVCache())
    with pytest.raises(TypeError, match=r"no attnkit\.nn\.Attention"):
        kv.use(torch.nn.Linear(2, 2))


def test_use_keeps_calls_without_a_cache_unchanged() -> None:
    model = tiny()
    with torch.no_grad():
        want = model(PROMPT)
        got = kv.use(model)(PROMPT)
    assert torch.equal(got, want)
