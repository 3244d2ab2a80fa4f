"""The catalog: every named attention mechanism of attnkit, as data.

The records and the registry are ``attnkit.mechanisms`` (see ``Mechanism`` for the three kinds:
``attention``, ``function``, ``layer``); the mechanisms that are a mask, a score function and a
bias register there. This package adds the ones built on higher layers: head layouts
(``heads``), linear and recurrent attention (``linear``) and the function and layer variants
(``variants``: RoPE, Music Transformer, ACT, gated outputs, GAAM, GPSA).

The CLI (``attnkit list``), the benchmarks and the tests all read this table, so a mechanism
added with ``register`` is listed, benchmarked and checked like the built-ins.

    from attnkit import catalog
    mech = catalog.get("sliding_window")
    spec = catalog.InputSpec(B=1, Tq=1024, Tk=1024, Hq=8)
    q, k, v = spec.make_inputs()
    out = attnkit.attention(q, k, v, **mech.build(spec))
"""

from attnkit.catalog import heads, linear, variants
from attnkit.mechanisms import (
    FAMILIES,
    KINDS,
    MECHANISMS,
    VASWANI,
    InputSpec,
    Mechanism,
    backends_for,
    core,
    document_segments,
    get,
    padding_lengths,
    register,
    sparse,
)

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
    "heads",
    "linear",
    "padding_lengths",
    "register",
    "sparse",
    "variants",
]
