"""Catalog entries of the core: exact attention, masks, score functions and biases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnkit import masks, positional, scores
from attnkit.mechanisms.base import InputSpec, Mechanism, register

# -- deterministic ingredients for masks that need data --------------------------------------


def document_segments(spec: InputSpec, seed: int = 0) -> Tensor:
    """Segment ids ``[B, Tk]`` of packed documents, drawn deterministically from ``spec``:
    document lengths uniform in ``[Tk/16, Tk/4]`` (at least 1), a different packing per row."""
    g = torch.Generator().manual_seed(seed + spec.Tk)
    low, high = max(1, spec.Tk // 16), max(2, spec.Tk // 4)
    rows = []
    for _ in range(spec.B):
        lengths = []
        while sum(lengths) < spec.Tk:
            lengths.append(int(torch.randint(low, high + 1, (1,), generator=g)))
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        rows.append(ids[: spec.Tk])
    return torch.stack(rows).to(spec.device)


def padding_lengths(spec: InputSpec) -> Tensor:
    """Real key counts ``[B]``: 3/4, 1/2, 1/4 of ``Tk`` cycling over the batch (at least 1)."""
    fractions = [0.75, 0.5, 0.25]
    lengths = [max(1, int(spec.Tk * fractions[b % 3])) for b in range(spec.B)]
    return torch.tensor(lengths, device=spec.device)


def _documents(spec: InputSpec) -> dict[str, Any]:
    kv_segments = document_segments(spec)
    q_segments = kv_segments[:, spec.Tk - spec.Tq :]  # bottom-right aligned queries
    mask = masks.documents(q_segments, kv_segment_ids=kv_segments)
    return {"mask": mask & masks.causal()}


def _relative_bias(spec: InputSpec) -> dict[str, Any]:
    max_distance = 128
    g = torch.Generator().manual_seed(0)
    table = torch.randn(spec.Hq, 2 * max_distance + 1, generator=g) * 0.02
    table = table.to(spec.device).requires_grad_(True)
    bias = positional.relative_bias(spec.Hq, max_distance, table=table)
    return {"mask": masks.causal(), "bias": bias}


VASWANI = (
    "Attention Is All You Need — Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser, "
    "Polosukhin (2017)"
)

KERPLE = (
    "KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation — Chi, Fan, "
    "Ramadge, Rudnicky (2022)"
)
T5 = (
    "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer — "
    "Raffel, Shazeer, Roberts, Lee, Narang, Matena, Zhou, Li, Liu (2020)"
)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _kerple(kernel: str) -> Callable[[InputSpec], dict[str, Any]]:
    def build(spec: InputSpec) -> dict[str, Any]:
        bias = positional.kerple(spec.Hq, kernel, generator=_generator(), device=spec.device)
        return {"mask": masks.causal(), "bias": bias}

    return build


def _t5(bidirectional: bool) -> Callable[[InputSpec], dict[str, Any]]:
    def build(spec: InputSpec) -> dict[str, Any]:
        bias = positional.t5_bias(
            spec.Hq, bidirectional=bidirectional, generator=_generator(), device=spec.device
        )
        return {"bias": bias} if bidirectional else {"mask": masks.causal(), "bias": bias}

    return build


for _mechanism in (
    Mechanism(
        "softmax",
        "exact",
        VASWANI,
        "dense softmax attention, every query sees every key",
        lambda spec: {},
    ),
    Mechanism(
        "causal",
        "static sparse",
        VASWANI,
        "softmax attention where query i sees keys j <= i (decoder self-attention)",
        lambda spec: {"mask": masks.causal()},
    ),
    Mechanism(
        "sliding_window",
        "static sparse",
        "Longformer: The Long-Document Transformer — Beltagy, Peters, Cohan (2020); "
        "Mistral 7B — Jiang et al. (2023)",
        "causal local attention over the last 256 keys: sliding_window(255)",
        lambda spec: {"mask": masks.sliding_window(255)},
    ),
    Mechanism(
        "sinks_window",
        "static sparse",
        "Efficient Streaming Language Models with Attention Sinks — Xiao, Tian, Chen, Han, "
        "Lewis (2024)",
        "StreamingLLM: the first 4 keys (sinks) plus a causal window of 256 keys",
        lambda spec: {"mask": (masks.sinks(4) | masks.sliding_window(255)) & masks.causal()},
    ),
    Mechanism(
        "prefix_lm",
        "static sparse",
        "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer — "
        "Raffel, Shazeer, Roberts, Lee, Narang, Matena, Zhou, Li, Liu (2020)",
        "bidirectional over the first quarter of the keys (the prefix), causal after it",
        lambda spec: {"mask": masks.prefix_lm(spec.Tk // 4)},
    ),
    Mechanism(
        "documents",
        "static sparse",
        "Efficient Sequence Packing without Cross-contamination: Accelerating Large Language "
        "Models without Impacting Performance — Krell, Kosec, Perez, Fitzgibbon (2021)",
        "packed sequences: causal attention within each document (lengths T/16..T/4, seeded)",
        _documents,
    ),
    Mechanism(
        "key_padding",
        "static sparse",
        "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding — "
        "Devlin, Chang, Lee, Toutanova (2019)",
        "bidirectional attention over the real (unpadded) keys of each batch entry",
        lambda spec: {"mask": masks.key_padding(padding_lengths(spec))},
    ),
    Mechanism(
        "sigmoid",
        "score",
        "Theory, Analysis, and Best Practices for Sigmoid Self-Attention — Ramapuram, Danieli, "
        "Dhekane, Weers, Busbridge, Ablin, Likhomanenko, Digani, Gu, Shidani, Webb (2024)",
        "causal sigmoid attention, weights sigmoid(s - log Tk), no row normalisation",
        lambda spec: {"mask": masks.causal(), "score": scores.sigmoid()},
    ),
    Mechanism(
        "softplus_l1",
        "score",
        "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language "
        "Models — Gao, Spratling (2025)",
        "causal LSSA: softplus(log(n_i) s) weights, l1-normalised per query",
        lambda spec: {"mask": masks.causal(), "score": scores.softplus_l1()},
    ),
    Mechanism(
        "softcap",
        "score",
        "Gemma 2: Improving Open Language Models at a Practical Size — Gemma Team, Riviere "
        "et al. (2024)",
        "causal softmax attention with logits soft-capped to 50 tanh(s / 50)",
        lambda spec: {"mask": masks.causal(), "score": scores.softcap(50.0)},
    ),
    Mechanism(
        "alibi",
        "positional",
        "Train Short, Test Long: Attention with Linear Biases Enables Input Length "
        "Extrapolation — Press, Smith, Lewis (2022)",
        "causal softmax attention with the linear distance penalty -m_h |i - j| per head",
        lambda spec: {
            "mask": masks.causal(),
            "bias": positional.alibi(spec.Hq, positional.alibi_slopes(spec.Hq).to(spec.device)),
        },
    ),
    Mechanism(
        "relative_bias",
        "positional",
        "Self-Attention with Relative Position Representations — Shaw, Uszkoreit, Vaswani (2018)",
        "causal softmax attention plus a learned scalar bias per head and offset (clipped at 128)",
        _relative_bias,
    ),
    Mechanism(
        "memory_efficient",
        "exact",
        "Self-attention Does Not Need O(n^2) Memory — Rabe, Staats (2021)",
        "exact causal softmax attention computed chunk by chunk with O(T·block) memory",
        lambda spec: {"mask": masks.causal()},
        backend="chunked",
    ),
    Mechanism(
        "cog",
        "score",
        "More Expressive Attention with Negative Weights — Lv, Xie, Li, Liao, Sun, Kang, Wang, "
        "Yan (2024)",
        "causal signed weights sign(s)·e^|s| / Σ e^|s| (SignExp), two merged positive passes",
        build=lambda spec: {"mask": masks.causal(), "score": scores.cog()},
    ),
    Mechanism(
        "relu",
        "score",
        "Replacing softmax with ReLU in Vision Transformers — Wortsman, Lee, Gilmer, Kornblith "
        "(2023)",
        "bidirectional ReLU attention as in ViT: weights relu(s) / Tk, no row normalisation",
        build=lambda spec: {"score": scores.relu()},
    ),
    Mechanism(
        "kerple_log",
        "positional",
        KERPLE,
        "causal softmax plus a learned -r1·log(1 + r2·|i-j|) per head",
        build=_kerple("log"),
    ),
    Mechanism(
        "kerple_power",
        "positional",
        KERPLE,
        "causal softmax plus a learned -r1·|i-j|^r2 per head, 0 < r2 < 2",
        build=_kerple("power"),
    ),
    Mechanism(
        "t5_bias",
        "positional",
        T5,
        "causal softmax plus a learned scalar per head and log-spaced distance bucket (32, 128)",
        build=_t5(bidirectional=False),
    ),
    Mechanism(
        "t5_bias_bidirectional",
        "positional",
        T5,
        "encoder form of the T5 bias: bidirectional buckets, no mask",
        build=_t5(bidirectional=True),
    ),
):
    register(_mechanism)
