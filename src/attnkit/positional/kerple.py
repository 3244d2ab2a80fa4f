"""KERPLE: relative-position biases from conditionally positive definite kernels.

"KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation" (Chi, Fan,
Ramadge, Rudnicky, 2022). With ``d = |pos_i - pos_j|`` and per-head ``r1, r2 > 0``:

    power:  bias = -r1 * d ** r2          (0 < r2 <= 2 keeps the kernel CPD)
    log:    bias = -r1 * log(1 + r2 * d)

A CPD kernel plus a constant is PD, and softmax ignores constants, so the scores stay an inner
product. The parameters are learned through unconstrained tensors (``r1 = softplus(raw)``; for
power ``r2 = 2 sigmoid(raw)``, for log ``r2 = softplus(raw)``), where the paper's code clamps
after each optimiser step: any optimiser keeps them in range here.

Exact reduction: the power kernel with ``r2 = 1`` is ALiBi with slopes ``r1``
(``-r1 |i - j|``). (The log kernel only tends to ALiBi with slopes ``r1 r2`` as ``r2 -> 0``.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.positional.bias import Bias, learnable

#: KERPLE's code clamps both parameters to at least this after every step; also the floor of
#: the initial draw here.
MIN_PARAMETER = 1e-2


def _inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


@dataclass(frozen=True)
class Kernel:
    """One KERPLE variant: how ``r2`` is kept in range and the bias it gives."""

    r2: Callable[[Tensor], Tensor]
    r2_raw: Callable[[Tensor], Tensor]
    r2_valid: Callable[[Tensor], Tensor]
    r2_range: str
    bias: Callable[[Tensor, Tensor, Tensor], Tensor]


KERNELS: dict[str, Kernel] = {
    "power": Kernel(
        r2=lambda raw: 2 * torch.sigmoid(raw),
        r2_raw=lambda r2: torch.logit(r2 / 2),
        r2_valid=lambda r2: (r2 > 0) & (r2 < 2),
        r2_range="0 < r2 < 2",
        bias=lambda d, r1, r2: -r1 * d.pow(r2),
    ),
    "log": Kernel(
        r2=F.softplus,
        r2_raw=_inverse_softplus,
        r2_valid=lambda r2: r2 > 0,
        r2_range="r2 > 0",
        bias=lambda d, r1, r2: -r1 * torch.log1p(r2 * d),
    ),
}


def _kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"unknown KERPLE kernel {name!r}; choose one of: {', '.join(KERNELS)}")
    return KERNELS[name]


class Kerple(Bias):
    """KERPLE bias ``-r1 * |pos_i - pos_j| ** r2`` (``kernel="power"``) or
    ``-r1 * log(1 + r2 |pos_i - pos_j|)`` (``kernel="log"``), per head.

    Chi et al. (2022), "KERPLE: Kernelized Relative Positional Embedding for Length
    Extrapolation". ``r1_raw``, ``r2_raw`` ``[H]`` are the unconstrained learned tensors (see
    the module docstring); ``r1`` and ``r2`` give the kernel parameters. Build one with
    ``kerple(...)``.
    """

    offset_only = True

    def __init__(self, kernel: str, r1_raw: Tensor, r2_raw: Tensor):
        _kernel(kernel)
        if r1_raw.dim() != 1 or r1_raw.shape != r2_raw.shape:
            raise ValueError(
                f"KERPLE parameters must both be [H], got r1 {tuple(r1_raw.shape)} and "
                f"r2 {tuple(r2_raw.shape)}"
            )
        self.kernel, self.r1_raw, self.r2_raw = kernel, r1_raw, r2_raw
        self.name = f"kerple_{kernel}"

    @property
    def num_heads(self) -> int:
        return self.r1_raw.shape[0]

    @property
    def r1(self) -> Tensor:
        """``[H]``, > 0."""
        return F.softplus(self.r1_raw)

    @property
    def r2(self) -> Tensor:
        """``[H]``, in the kernel's range."""
        return KERNELS[self.kernel].r2(self.r2_raw)

    def value(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        kernel = KERNELS[self.kernel]
        distance = (q_pos - k_pos).abs().to(self.r1_raw.dtype)
        return kernel.bias(distance, F.softplus(self.r1_raw[h]), kernel.r2(self.r2_raw[h]))

    def parameters(self) -> list[Tensor]:
        return learnable([self.r1_raw, self.r2_raw])

    def _tensors(self) -> list[Tensor]:
        return [self.r1_raw, self.r2_raw]

    def to(self, dtype: torch.dtype) -> Bias:
        return Kerple(self.kernel, self.r1_raw.to(dtype), self.r2_raw.to(dtype))


def kerple(
    num_heads: int,
    kernel: str = "log",
    r1: Tensor | None = None,
    r2: Tensor | None = None,
    generator: torch.Generator | None = None,
    requires_grad: bool = True,
    device: torch.device | str | None = None,
) -> Kerple:
    """KERPLE bias for ``num_heads`` heads with the ``"log"`` or ``"power"`` kernel.

    ``r1``, ``r2`` ``[H]`` are the kernel parameters themselves (``r1 > 0``; ``r2 > 0`` for
    log, ``0 < r2 < 2`` for power); by default they are drawn as in the paper's code,
    ``r1 ~ U(0, 2)``, ``r2 ~ U(0, 1)`` (at least 0.01). The returned bias holds them as
    unconstrained leaf tensors ``r1_raw``, ``r2_raw`` (trainable if ``requires_grad``) on
    ``device`` (default: where ``r1`` is, else the CPU).
    """
    spec = _kernel(kernel)
    if num_heads <= 0:
        raise ValueError(f"num_heads must be > 0, got {num_heads}")
    if r1 is None:
        r1 = (torch.rand(num_heads, generator=generator) * 2).clamp_min(MIN_PARAMETER)
    if r2 is None:
        r2 = torch.rand(num_heads, generator=generator).clamp_min(MIN_PARAMETER)
    for label, t in (("r1", r1), ("r2", r2)):
        if t.shape != (num_heads,):
            raise ValueError(f"KERPLE {label} must have shape [{num_heads}], got {tuple(t.shape)}")
    if not (r1 > 0).all():
        raise ValueError(f"KERPLE r1 must be > 0, got {r1.tolist()}")
    if not spec.r2_valid(r2).all():
        raise ValueError(f"KERPLE {kernel} kernel needs {spec.r2_range}, got r2 = {r2.tolist()}")
    device = r1.device if device is None else device
    r1_raw = _inverse_softplus(r1.detach()).to(device).requires_grad_(requires_grad)
    r2_raw = spec.r2_raw(r2.detach()).to(device).requires_grad_(requires_grad)
    return Kerple(kernel, r1_raw, r2_raw)
