"""Positional schemes: additive score biases and rotary embeddings.

Biases (``Bias`` subclasses, passed as ``attnkit.attention(..., bias=...)``; they run on every
backend):

- ``alibi`` — ALiBi (Press et al., 2022)
- ``relative_bias`` — learned scalar per clipped offset (Shaw et al., 2018)
- ``t5_bias`` — T5's bucketed relative bias (Raffel et al., 2020)
- ``kerple`` — KERPLE power / log kernels (Chi et al., 2022)
- ``grid_position_bias`` — ConViT's positional scores on a patch grid (d'Ascoli et al., 2021)
- ``from_score_mod`` — a FlexAttention ``score_mod`` that adds a term of the positions

Applied to q/k:

- ``Rotary`` — RoPE (Su et al., 2021) with linear / NTK / dynamic NTK / YaRN scaling
- ``relative_attention`` — Music Transformer relative attention with the skew (Huang et al., 2018)

ConViT's gated layer that mixes content attention with ``grid_position_bias`` is
``attnkit.variants.GPSA``.
"""

from attnkit.positional.alibi import ALiBi, alibi, alibi_slopes
from attnkit.positional.bias import Bias
from attnkit.positional.grid_bias import (
    GridPositionBias,
    grid_position_bias,
    grid_relative_positions,
    locality_init,
)
from attnkit.positional.kerple import KERNELS, Kerple, kerple
from attnkit.positional.learned import (
    RelativePositionBias,
    T5RelativeBias,
    relative_bias,
    t5_bias,
    t5_relative_bucket,
)
from attnkit.positional.relative import (
    relative_attention,
    relative_attention_reference,
    relative_logits,
    relative_logits_gather,
)
from attnkit.positional.rotary import (
    HF_ROPE_TYPES,
    LAYOUTS,
    SCALINGS,
    DynamicNTKScaling,
    LinearScaling,
    NTKScaling,
    Rotary,
    YaRNScaling,
    rotary_reference,
)
from attnkit.positional.score_mod import ScoreModBias, from_score_mod

__all__ = [
    "HF_ROPE_TYPES",
    "KERNELS",
    "LAYOUTS",
    "SCALINGS",
    "ALiBi",
    "Bias",
    "DynamicNTKScaling",
    "GridPositionBias",
    "Kerple",
    "LinearScaling",
    "NTKScaling",
    "RelativePositionBias",
    "Rotary",
    "ScoreModBias",
    "T5RelativeBias",
    "YaRNScaling",
    "alibi",
    "alibi_slopes",
    "from_score_mod",
    "grid_position_bias",
    "grid_relative_positions",
    "kerple",
    "locality_init",
    "relative_attention",
    "relative_attention_reference",
    "relative_bias",
    "relative_logits",
    "relative_logits_gather",
    "rotary_reference",
    "t5_bias",
    "t5_relative_bucket",
]
