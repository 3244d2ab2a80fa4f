"""Composable attention masks: ``causal() & sliding_window(255) | sinks(4)``.

See ``attnkit.masks.base`` for the algebra and the three views every mask provides.
"""

from attnkit.masks.base import EMPTY, FULL, PARTIAL, BlockStructure, Mask, row_counts
from attnkit.masks.blockwise import (
    block_causal,
    chunked,
    longlora_shift,
    power_attention,
    s2_attention,
    scca,
    shifted_chunks,
)
from attnkit.masks.heads import duo, per_head, windows_per_head
from attnkit.masks.mask_mod import from_mask_mod
from attnkit.masks.neighborhood import halo, neighborhood
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
from attnkit.masks.structured import dilated_window, global_tokens, strided

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "BlockStructure",
    "Mask",
    "block_causal",
    "causal",
    "chunked",
    "dilated_window",
    "documents",
    "duo",
    "from_dense",
    "from_mask_mod",
    "full",
    "global_tokens",
    "halo",
    "key_padding",
    "keys",
    "longlora_shift",
    "neighborhood",
    "per_head",
    "power_attention",
    "prefix_lm",
    "row_counts",
    "s2_attention",
    "scca",
    "shifted_chunks",
    "sinks",
    "sliding_window",
    "strided",
    "windows_per_head",
]
