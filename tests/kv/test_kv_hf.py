"""attnkit.kv caches in transformers' generate, on small random Llama / Mistral models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from attnkit import kv, masks
from attnkit.integrations import hf as integration
from attnkit.kv import hf

SIZES = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES)).eval()


def batch():
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0  # left padding
    return {"input_ids": ids, "attention_mask": attention_mask}


def generate(model, cache=None, **extra):
    with torch.no_grad():
        return model.generate(
            **batch(),
            past_key_values=cache,
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **extra,
        )


UNLIMITED = {
    "full": kv.FullCache(),
    "streaming_llm": kv.StreamingLLM(10**6),
    "h2o": kv.H2O(10**6),
    "snapkv": kv.SnapKV(10**6, window=4),
    "duo": kv.DuoAttention(torch.zeros(2, 2, dtype=torch.bool), recent=10**6),
}


@pytest.mark.parametrize("name", list(UNLIMITED))
def test_unlimited_budget_generates_like_transformers(name: str) -> None:
    model = llama()
    want = generate(model)
    cache = hf.KVCacheHF(UNLIMITED[name], model.config)
    got = generate(hf.prepare(model), cache)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # padding keys are never stored: row 1 holds its 7 real prompt tokens + 6 generated - 1
    # (the last generated token is not fed back)
    assert cache.store.stored(0).tolist() == [[17, 17], [12, 12]]
    assert cache.store.seen(0) == 17


def test_streaming_cache_in_generate_equals_the_sinks_and_window_mask() -> None:
    """Teacher-forced decoding through KVCacheHF(StreamingLLM) equals a full forward whose
    mask (ANDed with the model's causal and padding mask) allows each row's first 2 real tokens
    (the sinks: padding is never a sink) and a window of 5 keys before the query."""
    model = llama()
    inputs = batch()
    real = inputs["attention_mask"].bool()
    T = real.shape[1]
    sink = (real.cumsum(1) <= 2) & real  # [B, T]
    window = masks.sliding_window(5).dense(T, T)[0, 0]  # [T, T]
    allowed = (sink[:, None, None, :] | window).expand(2, 1, T, T)
    name = integration.register("kv-test-streaming", mask=masks.from_dense(allowed.contiguous()))
    model.set_attn_implementation(name)
    with torch.no_grad():
        want = model(**inputs).logits
    hf.prepare(model)
    cache = hf.KVCacheHF(kv.StreamingLLM(7, sinks=2), model.config)
    got = []
    with torch.no_grad():
        for t in range(inputs["input_ids"].shape[1]):
            step = model(
                input_ids=inputs["input_ids"][:, t : t + 1],
                attention_mask=inputs["attention_mask"][:, : t + 1],
                past_key_values=cache,
            )
            got.append(step.logits)
    got = torch.cat(got, dim=1)
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)  # padded queries: garbage
    assert cache.store.positions(0)[0, 0].tolist() == [0, 1, 7, 8, 9, 10, 11]
    assert cache.store.positions(0)[1, 1].tolist() == [5, 6, 7, 8, 9, 10, 11]  # 7 real tokens


def test_sliding_window_and_softcap_model_masks_are_evaluated_at_kept_positions() -> None:
    """Gemma 2 (alternating sliding-window and full layers, logit soft-capping): transformers'
    own mask functions (not causal) are evaluated at the original positions each head kept."""
    torch.manual_seed(0)
    config = Gemma2Config(**SIZES, head_dim=16, sliding_window=5, attn_logit_softcapping=5.0)
    model = Gemma2ForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    want = generate(model)
    got = generate(hf.prepare(model), hf.KVCacheHF(kv.H2O(10**6), model.config))
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_eviction_in_generate_stores_fewer_keys_per_head() -> None:
    model = hf.prepare(llama())
    flags = torch.tensor([[True, False], [False, False]])
    cache = hf.KVCacheHF(kv.DuoAttention(flags, sinks=1, recent=3), model.config)
    generate(model, cache)
    assert cache.store.stored(0).tolist() == [[17, 4], [12, 4]]
    assert cache.store.stored(1).tolist() == [[4, 4], [4, 4]]
    assert cache.store.nbytes() < cache.store.full_nbytes()


def test_without_prepare_or_with_bad_options_generate_fails_clearly() -> None:
    model = llama()
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match=r"attnkit\.kv\.hf\.prepare"):
        generate(model, hf.KVCacheHF(kv.StreamingLLM(8), model.config))
    with pytest.raises(ValueError, match="model has 2 layers and 2 KV heads"):
        hf.KVCacheHF(kv.DuoAttention(torch.ones(2, 3, dtype=torch.bool)), model.config)
    with pytest.raises(ValueError, match="3 per-layer entries"):
        hf.KVCacheHF(kv.H2O([8, 8, 8]), model.config)
    hf.prepare(model)
    with pytest.raises(NotImplementedError, match="beam search"):
        generate(model, hf.KVCacheHF(None, model.config), num_beams=2)


def test_prepared_model_without_a_kv_cache_is_exact() -> None:
    model = llama()
    inputs = batch()
    with torch.no_grad():
        want = model(**inputs).logits
        got = hf.prepare(model)(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
