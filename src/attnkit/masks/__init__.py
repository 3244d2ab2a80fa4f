"""Composable attention masks: ``causal() & sliding_window(255) | sinks(4)``.

See ``attnkit.masks.base`` for the algebra and the three views every mask provides.
"""

from attnkit.masks.base import EMPTY, FULL, PARTIAL, BlockStructure, Mask, row_counts
from attnkit.masks.patterns import (
    causal,
    documents,
    from_dense,
    full,
    key_padding,
    keys,
    prefix_lm,
    sinks,
    sliding_window,
)

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "BlockStructure",
    "Mask",
    "causal",
    "documents",
    "from_dense",
    "full",
    "key_padding",
    "keys",
    "prefix_lm",
    "row_counts",
    "sinks",
    "sliding_window",
]
