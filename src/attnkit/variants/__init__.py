"""Variants of the attention operator's output and normaliser that live outside the score
function: gated outputs, Gaussian adaptive attention, inference-time sink calibration, and
ConViT's gated positional self-attention.

| module  | mechanism                                                                          |
|---------|------------------------------------------------------------------------------------|
| gated   | sigmoid gate on each head's SDPA output (Qiu et al., 2025)                           |
| gaam    | multi-head Gaussian adaptive attention over features (Ioannides et al., 2024)       |
| act     | attention calibration of hidden sinks at inference (Yu et al., ICML 2024)           |
| gpsa    | content and positional attention mixed by a learned gate (d'Ascoli et al., 2021)     |

Cog attention (signed weights) is a score function: ``attnkit.scores.cog()``.
"""

from attnkit.variants.act import (
    ACTConfig,
    calibrate_weights,
    calibrated_attention,
    detect_sinks,
    find_sinks,
    reference_calibrated_attention,
    visible_query_counts,
)
from attnkit.variants.gaam import (
    GaussianAdaptiveAttention,
    gaussian_adaptive_weights,
    gaussian_adaptive_weights_reference,
)
from attnkit.variants.gated import OutputGate, gate_output, gate_output_reference
from attnkit.variants.gpsa import (
    GPSA,
    gated_positional_attention,
    gated_positional_attention_reference,
)

__all__ = [
    "GPSA",
    "ACTConfig",
    "GaussianAdaptiveAttention",
    "OutputGate",
    "calibrate_weights",
    "calibrated_attention",
    "detect_sinks",
    "find_sinks",
    "gate_output",
    "gate_output_reference",
    "gated_positional_attention",
    "gated_positional_attention_reference",
    "gaussian_adaptive_weights",
    "gaussian_adaptive_weights_reference",
    "reference_calibrated_attention",
    "visible_query_counts",
]
