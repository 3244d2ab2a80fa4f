"""Catalog entries that are functions of (q, k, v) or layers: RoPE and its scalings, Music
Transformer relative attention, ACT, gated outputs, GAAM and GPSA."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from attnkit import masks, positional, variants
from attnkit import nn as ak
from attnkit.api import attention
from attnkit.mechanisms import InputSpec, Mechanism, register
from attnkit.positional.rotary import LinearScaling, YaRNScaling, rotary_reference
from attnkit.testing import reference_attention


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# -- function mechanisms: RoPE, Music Transformer, ACT ----------------------------------------


def _rope_scalings(spec: InputSpec) -> dict[str, Any]:
    return {
        "rope": None,
        "rope_linear": LinearScaling(4.0),
        "rope_yarn": YaRNScaling(4.0, original_max_position=max(1, spec.Tk // 4)),
    }


def _rope(name: str, reference: bool) -> Callable[[InputSpec], Callable[..., Tensor]]:
    def make(spec: InputSpec) -> Callable[..., Tensor]:
        rotary = positional.Rotary(spec.D, scaling=_rope_scalings(spec)[name])
        q_pos = torch.arange(spec.Tk - spec.Tq, spec.Tk, device=spec.device)
        if reference:
            return lambda q, k, v: reference_attention(
                rotary_reference(rotary, q, q_pos),
                rotary_reference(rotary, k),
                v,
                mask=masks.causal(),
            )
        return lambda q, k, v: attention(rotary(q, q_pos), rotary(k), v, mask=masks.causal())

    return make


def _music(reference: bool) -> Callable[[InputSpec], Callable[..., Tensor]]:
    fn = positional.relative_attention_reference if reference else positional.relative_attention

    def make(spec: InputSpec) -> Callable[..., Tensor]:
        g = _generator()
        rel_emb = (torch.randn(spec.Hq, spec.Tk, spec.D, generator=g) * 0.1).to(spec.device)
        return lambda q, k, v: fn(q, k, v, rel_emb.to(q.dtype))

    return make


def _act(reference: bool) -> Callable[[InputSpec], Callable[..., Tensor]]:
    fn = variants.reference_calibrated_attention if reference else variants.calibrated_attention

    def make(spec: InputSpec) -> Callable[..., Tensor]:
        config = variants.ACTConfig(heads=tuple(range(spec.Hq)))
        return partial(fn, config=config, mask=masks.causal())

    return make


# -- layer mechanisms ------------------------------------------------------------------------


def _gated(kind: str) -> Callable[[InputSpec], Any]:
    def make(spec: InputSpec) -> Any:
        return ak.Attention(
            ak.AttentionConfig(
                d_model=spec.Hq * spec.D,
                n_heads=spec.Hq,
                n_kv_heads=spec.kv_heads,
                head_dim=spec.D,
                gate=kind,
            )
        )

    return make


def _gaam(spec: InputSpec) -> Any:
    return variants.GaussianAdaptiveAttention(num_heads=spec.Hq, num_gaussians=1, dim=-1)


def _square_grid(T: int) -> tuple[int, int]:
    """The most square ``(h, w)`` with ``h * w == T`` (GPSA needs a patch grid)."""
    h = math.isqrt(T)
    while T % h:
        h -= 1
    return h, T // h


def _gpsa(spec: InputSpec) -> Any:
    return variants.GPSA(d_model=spec.Hq * spec.D, n_heads=spec.Hq, grid=_square_grid(spec.Tk))


for _mechanism in (
    Mechanism(
        "gated_attention",
        "score",
        "Gated Attention for Large Language Models: Non-linearity, Sparsity, and "
        "Attention-Sink-Free — Qiu, Wang, Zheng, Huang, Wen, Yang, Men, Yu, Huang, Huang, Liu, "
        "Zhou, Lin (2025)",
        "GQA layer with a head-wise sigmoid gate on each head's attention output",
        layer=_gated("headwise"),
    ),
    Mechanism(
        "gated_attention_elementwise",
        "score",
        "Gated Attention for Large Language Models: Non-linearity, Sparsity, and "
        "Attention-Sink-Free — Qiu, Wang, Zheng, Huang, Wen, Yang, Men, Yu, Huang, Huang, Liu, "
        "Zhou, Lin (2025)",
        "GQA layer with an element-wise sigmoid gate on the attention output",
        layer=_gated("elementwise"),
    ),
    Mechanism(
        "gaam",
        "score",
        "Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across "
        "Multiple Modalities — Ioannides, Chadha, Elkins (2024)",
        "features re-weighted by per-head Gaussians with learnable mean offset and scale",
        layer=_gaam,
    ),
    Mechanism(
        "rope",
        "positional",
        "RoFormer: Enhanced Transformer with Rotary Position Embedding — Su, Lu, Pan, Murtadha, "
        "Wen, Liu (2021)",
        "causal softmax on rotary-embedded q and k (Llama's rotate-half layout)",
        run=_rope("rope", reference=False),
        reference=_rope("rope", reference=True),
    ),
    Mechanism(
        "rope_linear",
        "positional",
        "Extending Context Window of Large Language Models via Positional Interpolation — Chen, "
        "Wong, Chen, Tian (2023)",
        "RoPE with positions interpolated by 4 (linear scaling)",
        run=_rope("rope_linear", reference=False),
        reference=_rope("rope_linear", reference=True),
    ),
    Mechanism(
        "rope_yarn",
        "positional",
        "YaRN: Efficient Context Window Extension of Large Language Models — Peng, Quesnelle, "
        "Fan, Shippole (2023)",
        "RoPE with YaRN scaling by 4 (per-frequency ramp and attention temperature)",
        run=_rope("rope_yarn", reference=False),
        reference=_rope("rope_yarn", reference=True),
    ),
    Mechanism(
        "music_relative",
        "positional",
        "Music Transformer: Generating Music with Long-Term Structure — Huang, Vaswani, "
        "Uszkoreit, Shazeer, Simon, Hawthorne, Dai, Hoffman, Dinculescu, Eck (2018)",
        "causal softmax plus q_i·e_(j-i) relative logits computed with the skew",
        run=_music(reference=False),
        reference=_music(reference=True),
    ),
    Mechanism(
        "gpsa",
        "positional",
        "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases — "
        "d'Ascoli, Touvron, Leavitt, Morcos, Biroli, Sagun (2021)",
        "per-head gated mix of content and positional attention on a patch grid (layer)",
        layer=_gpsa,
    ),
    Mechanism(
        "act",
        "analysis",
        "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models "
        "without Training through Attention Calibration — Yu, Wang, Fu, Shi, Shaikh, Lin (2024)",
        "causal softmax with detected sink weights x0.4 in every head, mass redistributed",
        run=_act(reference=False),
        reference=_act(reference=True),
    ),
):
    register(_mechanism)
