"""attnkit: the attention mechanisms of modern deep learning behind one API.

    import attnkit
    from attnkit import masks, scores

    out = attnkit.attention(q, k, v, mask=masks.causal() & masks.sliding_window(255))

Tensors are ``[B, T, H, D]``. See ``attnkit.attention`` for the full contract.
"""

from attnkit import grid, masks, positional, scores
from attnkit.api import Explanation, attention, explain
from attnkit.call import Aux, AuxOutput
from attnkit.merge import merge, merge_all
from attnkit.version import __version__

__all__ = [
    "Aux",
    "AuxOutput",
    "Explanation",
    "__version__",
    "attention",
    "explain",
    "grid",
    "masks",
    "merge",
    "merge_all",
    "positional",
    "scores",
]
