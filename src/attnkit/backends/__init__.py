"""The backend table. Adding a backend = one module with a ``BACKEND`` record + one line here.

| name        | runs                                                                  |
|-------------|-----------------------------------------------------------------------|
| reference   | dense fp32/fp64 math, every feature — the oracle                      |
| sdpa        | torch scaled_dot_product_attention, dense softmax                     |
| flex        | compiled FlexAttention with analytic, cached BlockMasks (forward-only on CPU) |
| chunked     | online softmax over live key blocks in plain PyTorch, any score, autograd |
| blocksparse | softmax/sigmoid (+ ALiBi) over live tiles in a compiled CPU kernel, backward too |
"""

from __future__ import annotations

from attnkit.backends import blocksparse, chunked, flex, reference, sdpa
from attnkit.backends.base import Backend

BACKENDS: dict[str, Backend] = {
    b.BACKEND.name: b.BACKEND for b in (reference, sdpa, flex, chunked, blocksparse)
}


def register_backend(backend: Backend) -> None:
    """Add a user backend to the table (it becomes selectable by name, not by ``auto``)."""
    if backend.name in BACKENDS or backend.name == "auto":
        raise ValueError(f"a backend named {backend.name!r} already exists")
    BACKENDS[backend.name] = backend


__all__ = ["BACKENDS", "Backend", "register_backend"]
