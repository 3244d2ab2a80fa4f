"""Output allocation for kernels: plain ``torch.empty``, or NaN-filled under
``attnkit.testing.nan_filled_outputs()`` so unwritten memory fails tests loudly."""

from __future__ import annotations

import torch
from torch import Tensor

FILL_NAN = False


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty`` (NaN-filled while testing)."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if FILL_NAN:
        out.fill_(float("nan"))
    return out
