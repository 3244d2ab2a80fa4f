"""Catalog entries for head layouts: each is an ``attnkit.nn.Attention`` layer with
that layout, the model's RoPE and causal softmax attention."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attnkit import nn as ak
from attnkit.heads import mla_from_gqa
from attnkit.mechanisms import InputSpec, Mechanism, register


def _layer(
    layout: str, grouped: bool = True, **options: Any
) -> Callable[[InputSpec], ak.Attention]:
    """A factory of causal ``Attention`` layers of ``layout``; ``grouped`` layouts get the
    spec's KV heads, the others (MHA, MQA, MLA) decide their own."""

    def make(spec: InputSpec) -> ak.Attention:
        return ak.Attention(
            ak.AttentionConfig(
                d_model=spec.Hq * spec.D,
                n_heads=spec.Hq,
                n_kv_heads=spec.kv_heads if grouped else None,
                head_dim=spec.D,
                layout=(layout, options),
            )
        )

    return make


def _transmla(spec: InputSpec) -> ak.Attention:
    layer = _layer("gqa")(spec)
    layer.heads = mla_from_gqa(layer.heads)
    return layer


for _mechanism in (
    Mechanism(
        "mha",
        "heads",
        "Attention Is All You Need — Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser, "
        "Polosukhin (2017)",
        "one key/value head per query head; cache 2·Hq·D per token",
        layer=_layer("mha", grouped=False),
    ),
    Mechanism(
        "gqa",
        "heads",
        "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints — "
        "Ainslie, Lee-Thorp, de Jong, Zemlyanskiy, Lebrón, Sanghai (2023)",
        "query heads share Hkv key/value heads; cache 2·Hkv·D per token",
        layer=_layer("gqa"),
    ),
    Mechanism(
        "mqa",
        "heads",
        "Fast Transformer Decoding: One Write-Head is All You Need — Shazeer (2019)",
        "a single key/value head for all query heads; cache 2·D per token",
        layer=_layer("mqa", grouped=False),
    ),
    Mechanism(
        "mla",
        "heads",
        "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model — "
        "DeepSeek-AI (2024)",
        "low-rank joint KV latent + decoupled RoPE; absorbed decoding over the latent cache",
        layer=_layer("mla", grouped=False),
    ),
    Mechanism(
        "transmla",
        "heads",
        "TransMLA: Multi-Head Latent Attention Is All You Need — Meng et al. (2025)",
        "a GQA layer converted exactly into MLA: same outputs, same cache size",
        layer=_transmla,
    ),
    Mechanism(
        "moh",
        "heads",
        "MoH: Multi-Head Attention as Mixture-of-Head Attention — Jin, Zhu, Yuan, Yan (2024)",
        "shared heads + top-k routed heads, outputs weighted by two-stage gates",
        layer=_layer("moh", n_shared=1),
    ),
    Mechanism(
        "kdgqa",
        "heads",
        "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention — Khan et al. "
        "(2024)",
        "query heads allocated to KV groups by this call's key-head norms",
        layer=_layer("kdgqa"),
    ),
    Mechanism(
        "dgqa",
        "heads",
        "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention — Khan et al. "
        "(2024)",
        "query heads allocated to KV groups by an EMA of key-head norms",
        layer=_layer("dgqa"),
    ),
    Mechanism(
        "dcmha",
        "heads",
        "Improving Transformers with Dynamically Composable Multi-Head Attention — Xiao, Meng, "
        "Li, Yuan (2024)",
        "input-dependent cross-head composition of scores and weights (dense)",
        layer=_layer("dcmha"),
    ),
    Mechanism(
        "knocking_heads",
        "heads",
        "Knocking-Heads Attention — Zhou et al. (2025)",
        "a shared, identity-initialised map across heads on the values before attention",
        layer=_layer("knocking_heads"),
    ),
    Mechanism(
        "talking_heads",
        "heads",
        "Talking-Heads Attention — Shazeer, Lan, Cheng, Ding, Hou (2020)",
        "learned mixing across heads of the logits and of the weights (dense)",
        layer=_layer("talking_heads"),
    ),
):
    register(_mechanism)
