"""attnkit as a Hugging Face attention implementation, proven on real pretrained models."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers.masking_utils import (
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from attnkit import masks, scores
from attnkit.integrations import hf, models
from attnkit.masks.patterns import DenseMask

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "To be or not",
    "Now is the winter of our discontent made glorious summer",
]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = models.smollm2()
    yield model, tokenizer
    model.set_attn_implementation("sdpa")


@pytest.fixture(scope="module")
def padded_batch(smollm2):
    _, tokenizer = smollm2
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].bool().all(), "the batch must contain padding"
    return batch


def logits_with(model, implementation: str, batch) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**batch).logits


# -- the mask function -----------------------------------------------------------------------


def evaluated(**kwargs) -> torch.Tensor:
    B, Tq, Tk = kwargs["batch_size"], kwargs["q_length"], kwargs["kv_length"]
    dense = sdpa_mask(allow_is_causal_skip=False, **kwargs)
    return dense.expand(B, 1, Tq, Tk)


LEFT_PADDING = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
MASK_CASES = {
    "causal": dict(batch_size=2, q_length=7, kv_length=7),
    "causal_left_padding": dict(batch_size=2, q_length=7, kv_length=7, attention_mask=LEFT_PADDING),
    "decode_step": dict(
        batch_size=2, q_length=1, kv_length=7, q_offset=6, attention_mask=LEFT_PADDING
    ),
    "sliding_window": dict(
        batch_size=2,
        q_length=7,
        kv_length=7,
        mask_function=sliding_window_causal_mask_function(3),
        local_size=3,
        attention_mask=LEFT_PADDING,
    ),
    "bidirectional": dict(
        batch_size=2,
        q_length=7,
        kv_length=7,
        mask_function=lambda b, h, q, k: q >= 0,
        attention_mask=LEFT_PADDING,
    ),
    # A cache longer than what it holds (static-cache layout): not bottom-right aligned.
    "static_cache": dict(batch_size=1, q_length=2, kv_length=9, q_offset=3),
}


@pytest.mark.parametrize("name", MASK_CASES)
def test_model_mask_equals_the_mask_transformers_evaluates(name: str) -> None:
    kwargs = MASK_CASES[name]
    mask = hf.model_mask(**kwargs)
    dense = mask.dense(kwargs["q_length"], kwargs["kv_length"])
    assert torch.equal(dense.expand(kwargs["batch_size"], 1, -1, -1), evaluated(**kwargs))


def test_model_mask_is_analytic_where_a_pattern_fits_and_dense_otherwise() -> None:
    assert repr(hf.model_mask(**MASK_CASES["causal"])) == "causal"
    assert "keys" in repr(hf.model_mask(**MASK_CASES["causal_left_padding"]))
    assert "sliding_window" in repr(hf.model_mask(**MASK_CASES["sliding_window"]))
    assert isinstance(hf.model_mask(**MASK_CASES["static_cache"]), DenseMask)
    default = hf.model_mask(batch_size=1, q_length=3, kv_length=3)
    assert torch.equal(
        default.dense(3, 3)[0, 0],
        sdpa_mask(1, 3, 3, mask_function=causal_mask_function, allow_is_causal_skip=False)[0, 0],
    )


# -- SmolLM2 --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "chunked"])
def test_smollm2_logits_equal_its_sdpa_implementation(smollm2, padded_batch, backend) -> None:
    model, _ = smollm2
    expected = logits_with(model, "sdpa", padded_batch)
    got = logits_with(model, hf.register(f"attnkit-test-{backend}", backend=backend), padded_batch)
    real = padded_batch["attention_mask"].bool()  # padded positions are not predictions
    assert (got - expected)[real].abs().max().item() <= 1e-4


def test_smollm2_greedy_generation_is_identical(smollm2, padded_batch) -> None:
    model, _ = smollm2

    def generate(implementation: str) -> torch.Tensor:
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            return model.generate(**padded_batch, max_new_tokens=12, do_sample=False)

    expected = generate("sdpa")
    assert torch.equal(generate(hf.register("attnkit")), expected)


def test_variants_by_name_change_the_output(smollm2, padded_batch) -> None:
    model, _ = smollm2
    exact = logits_with(model, hf.register("attnkit"), padded_batch)
    real = padded_batch["attention_mask"].bool()
    # A window wider than the prompt is exact; a window of 2 keys is not.
    wide = hf.register("attnkit-test-wide", mask=masks.sinks(1) | masks.sliding_window(63))
    assert (logits_with(model, wide, padded_batch) - exact)[real].abs().max() <= 1e-4
    narrow = hf.register("attnkit-test-narrow", mask=masks.sliding_window(1))
    assert (logits_with(model, narrow, padded_batch) - exact)[real].abs().max() > 1.0
    sigmoid = hf.register("attnkit-test-sigmoid", score=scores.sigmoid())
    assert (logits_with(model, sigmoid, padded_batch) - exact)[real].abs().max() > 1.0
    by_name = hf.register("attnkit-test-catalog", mechanism="sinks_window")
    assert (logits_with(model, by_name, padded_batch) - exact)[real].abs().max() <= 1e-4


def test_captured_key_sums_equal_eager_attention_weights(smollm2, padded_batch) -> None:
    model, _ = smollm2
    model.set_attn_implementation("eager")
    with torch.no_grad():
        weights = model(**padded_batch, output_attentions=True).attentions
    model.set_attn_implementation(hf.register("attnkit"))
    with torch.no_grad(), hf.capture(key_sums=slice(-4, None)) as record:
        model(**padded_batch)
    assert sorted(record.stats) == list(range(model.config.num_hidden_layers))
    for layer in (0, 15, 29):
        expected = weights[layer][:, :, -4:, :].sum(2)
        got = record.stats[layer][0].key_sums
        assert torch.allclose(got, expected, atol=1e-5)


def test_unsupported_requests_raise(smollm2, padded_batch) -> None:
    model, _ = smollm2
    layer = model.model.layers[0].self_attn
    model.set_attn_implementation(hf.register("attnkit"))
    q = torch.randn(1, 9, 4, 64)
    kv = torch.randn(1, 3, 4, 64)
    with pytest.raises(ValueError, match="dropout"):
        hf._attention_forward(layer, q, kv, kv, None, dropout=0.1)
    with pytest.raises(ValueError, match="sink logits"):
        hf._attention_forward(layer, q, kv, kv, None, s_aux=torch.zeros(9))
    with pytest.raises(TypeError, match="float32 attention mask"):
        hf._attention_forward(layer, q, kv, kv, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="not both"):
        hf.register("attnkit-bad", mechanism="causal", score=scores.sigmoid())
    with pytest.raises(KeyError, match="no mechanism named"):
        hf.register("attnkit-bad", mechanism="no_such_thing")
    with pytest.raises(ValueError, match="at least one"), hf.capture():
        pass


# -- MiniLM (an encoder: bidirectional attention with padding) -------------------------------


def test_minilm_embeddings_equal_its_sdpa_implementation() -> None:
    model, tokenizer = models.minilm()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].bool().all()

    def embed(implementation: str) -> torch.Tensor:
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        weight = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * weight).sum(1) / weight.sum(1)

    expected = embed("sdpa")
    got = embed(hf.register("attnkit"))
    assert (got - expected).abs().max().item() <= 1e-5


# -- attnkit layers inside the model: the GQA layers as attnkit.nn, then converted to MLA ------


def test_swapped_attnkit_layers_and_their_transmla_conversion_keep_the_logits(
    smollm2, padded_batch
) -> None:
    from attnkit.heads import mla_from_gqa

    model, _ = smollm2
    expected = logits_with(model, "sdpa", padded_batch)
    real = padded_batch["attention_mask"].bool()
    swapped = hf.swap_attention(copy.deepcopy(model))
    assert isinstance(swapped.model.layers[0].self_attn, hf.HFAttention)
    got = logits_with(swapped, hf.register("attnkit"), padded_batch)
    assert (got - expected)[real].abs().max().item() <= 1e-4

    def to_mla(layer):
        layer.heads = mla_from_gqa(layer.heads)
        return layer

    converted = hf.swap_attention(copy.deepcopy(model), convert=to_mla)
    mla = converted.model.layers[0].self_attn.attention.heads
    gqa_cache = 2 * model.config.num_key_value_heads * model.config.head_dim
    assert sum(mla.kv_cache_dims().values()) == gqa_cache  # TransMLA: same cache size
    got = logits_with(converted, hf.register("attnkit"), padded_batch)
    assert (got - expected)[real].abs().max().item() <= 1e-4
    with torch.no_grad():
        converted.set_attn_implementation("attnkit")
        generated = converted.generate(**padded_batch, max_new_tokens=8, do_sample=False)
        model.set_attn_implementation("sdpa")
        reference = model.generate(**padded_batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, reference)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_swapped_layer_reads_the_cache_under_either_keyword(keyword) -> None:
    # transformers 5.25 passes the layer's cache as `cache`; reading only `past_key_values`
    # made generate() attend each new token to itself.
    seen = []

    class Layer(torch.nn.Module):
        def forward(self, x, positions=None, cache=None, layer=0, mask=None):
            seen.append(cache)
            return x

    model_cache = object()
    hf.HFAttention(Layer(), 3)(torch.zeros(1, 2, 4), **{keyword: model_cache})
    assert isinstance(seen[0], hf._HFCache) and seen[0].cache is model_cache


def test_swap_attention_refuses_models_it_cannot_convert() -> None:
    with pytest.raises(TypeError, match="not a decoder-only model"):
        hf.swap_attention(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="only Llama-style attention"):
        hf.from_llama_attention(torch.nn.Linear(2, 2), None)
