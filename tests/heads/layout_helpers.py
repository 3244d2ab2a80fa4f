"""Helpers for head-layout tests: a local Llama RoPE, seeded inputs and weights, the 2x rule
on a layout with its weights as inputs, and a KV-caching ``attend`` wrapper."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attnkit.attend import Attend
from attnkit.testing import CheckReport, check_function


def llama_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """RoPE with Hugging Face Llama's ``rotate_half`` convention: ``x [B, T, H, D]``,
    ``positions`` int ``[T]`` or ``[B, T]``."""
    D = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    pos = positions.to(torch.float64)
    pos = pos.unsqueeze(0) if pos.dim() == 1 else pos
    angles = pos.unsqueeze(-1) * inv_freq  # [B or 1, T, D/2]
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # [B or 1, T, 1, D]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def make_x(B: int, T: int, C: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Seeded asymmetric input ``[B, T, C]`` (non-zero mean, uneven feature scales)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 1.5, C, dtype=torch.float64)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64) * scales + 0.2
    return x.to(dtype)


def randomize(
    module: nn.Module, seed: int = 0, gain: float = 2.0, skip: tuple[str, ...] = ()
) -> None:
    """Refill every parameter (except names containing a string of ``skip``) with seeded
    ``randn * gain / sqrt(fan_in)`` so attention is peaky rather than near-uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(
                torch.randn(p.shape, generator=g, dtype=torch.float64) * gain / math.sqrt(fan_in)
            )


def check_layout(
    layout: nn.Module,
    reference: Callable[..., Tensor],
    x: Tensor,
    attend: Attend,
    rotary: Callable[[Tensor, Tensor], Tensor] | None = llama_rope,
    positions: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> CheckReport:
    """The 2x rule for ``layout(x, attend, rotary, positions)`` against
    ``reference(x=..., **{parameter name: tensor})``, forward and backward, with the layout's
    parameters as inputs (``torch.func.functional_call``)."""
    params = {name: p.detach().to(dtype) for name, p in layout.named_parameters()}
    inputs = {"x": x.to(dtype), **params}

    def fn(x: Tensor, **weights: Tensor) -> Tensor:
        return functional_call(layout, weights, (x, attend, rotary, positions))

    return check_function(fn, reference, inputs)


class CachingAttend:
    """A minimal KV cache around an ``Attend``: appends each call's k/v and attends to all."""

    def __init__(self, attend: Attend):
        self.attend = attend
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.attend(q, self.k, self.v)

    def __getattr__(self, name: str):
        return getattr(self.attend, name)
