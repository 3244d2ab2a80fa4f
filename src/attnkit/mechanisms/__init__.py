"""The attention mechanisms that are a mask, a score function and a bias: records that
``attnkit.attention`` runs directly (kind ``attention``), and the registry every mechanism of
the catalog is recorded in (``attnkit.mechanisms.base``).

    from attnkit import mechanisms
    mech = mechanisms.get("sliding_window")
    spec = mechanisms.InputSpec(B=1, Tq=1024, Tk=1024, Hq=8)
    q, k, v = spec.make_inputs()
    out = attnkit.attention(q, k, v, **mech.build(spec))

``attnkit.nn`` layers take these by name (``AttentionConfig(mechanism="sliding_window")``).
``attnkit.catalog`` adds the mechanisms that are functions of ``(q, k, v)`` or layers (head
layouts, linear attention, RoPE, gated outputs) to the same registry.
"""

from attnkit.mechanisms import core, sparse
from attnkit.mechanisms.base import (
    FAMILIES,
    KINDS,
    MECHANISMS,
    InputSpec,
    Mechanism,
    backends_for,
    get,
    register,
)
from attnkit.mechanisms.core import VASWANI, document_segments, padding_lengths

__all__ = [
    "FAMILIES",
    "KINDS",
    "MECHANISMS",
    "VASWANI",
    "InputSpec",
    "Mechanism",
    "backends_for",
    "core",
    "document_segments",
    "get",
    "padding_lengths",
    "register",
    "sparse",
]
