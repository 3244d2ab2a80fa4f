"""KV budgets: how many tokens a policy keeps, per layer and per KV head.

A budget is given as

- an ``int`` (tokens) or a ``float`` in ``(0, 1]`` (a fraction of the context, the tokens a
  layer has seen at the end of its first call — the prompt);
- a sequence / 1-D tensor with one such value per layer (PyramidKV-style schedules);
- a 2-D tensor ``[num_layers, num_kv_heads]`` with one value per layer and KV head.

Rules, the same for every policy:

- a budget larger than the tokens a head holds keeps them all (no eviction until the head
  outgrows it), so a budget of ``1.0`` or of more tokens than the context is the full cache;
- a zero or negative budget, a fraction above 1, a boolean, and a per-layer / per-head budget
  whose shape differs from the model's layers and KV heads raise ``ValueError`` naming the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: What policies accept as a budget (parsed by ``Budget.of``).
BudgetSpec = int | float | Sequence[int] | Sequence[float] | Tensor


def _check_value(value: float, where: str) -> None:
    if isinstance(value, bool):
        raise ValueError(f"{where}: a budget is an int (tokens) or a float fraction, not a bool")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(
            f"{where}: budget {value} is not finite; for an unlimited cache use "
            "attnkit.kv.FullCache() or a budget of 1.0 (the whole context)"
        )
    if value <= 0:
        raise ValueError(
            f"{where}: zero or negative budget {value!r}: a KV cache keeps at least one token per "
            "head; give a positive int (tokens) or a fraction in (0, 1]"
        )
    if isinstance(value, float) and value > 1.0:
        raise ValueError(
            f"{where}: fractional budget {value} is above 1 (the whole context); give a fraction "
            "in (0, 1] or an int number of tokens"
        )


@dataclass(frozen=True)
class Budget:
    """Tokens to keep per layer and KV head (see the module docstring for the rules).

    ``values`` is a float64 tensor: ``[]`` (one budget), ``[num_layers]`` or
    ``[num_layers, num_kv_heads]``; ``fraction`` says whether its entries are fractions of the
    context (floats in ``(0, 1]``) or token counts (whole numbers).
    """

    values: Tensor
    fraction: bool

    @classmethod
    def of(cls, spec: BudgetSpec | Budget) -> Budget:
        """Parse an int, a float, a per-layer sequence or a per-(layer, head) tensor."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, (int, float)):
            _check_value(spec, "budget")
            return cls(torch.tensor(float(spec), dtype=torch.float64), isinstance(spec, float))
        if isinstance(spec, Tensor):
            if spec.dtype == torch.bool or spec.dim() > 2:
                raise ValueError(
                    f"budget tensor must be numbers [num_layers] or [num_layers, num_kv_heads], "
                    f"got {spec.dtype} {tuple(spec.shape)}"
                )
            fraction = spec.dtype.is_floating_point
            items = spec.flatten().tolist()
        elif isinstance(spec, Sequence) and not isinstance(spec, str):
            items = list(spec)
            kinds = {isinstance(x, float) for x in items}
            if len(kinds) > 1:
                raise ValueError(
                    f"per-layer budget mixes ints and floats: {items}; give all token counts "
                    "(ints) or all fractions (floats)"
                )
            fraction = kinds == {True}
            spec = torch.tensor(items, dtype=torch.float64)
        else:
            raise TypeError(
                f"budget must be an int, a float, a per-layer sequence or a tensor, got "
                f"{type(spec).__name__}"
            )
        if not items:
            raise ValueError("budget sequence is empty; give one value per layer")
        for i, x in enumerate(items):
            _check_value(float(x) if fraction else int(x), f"budget entry {i}")
        if not fraction and any(float(x) != int(x) for x in items):
            raise ValueError(f"token budgets must be whole numbers, got {items}")
        return cls(spec.detach().to(torch.float64).cpu(), fraction)

    def check(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise ``ValueError`` if a per-layer or per-head budget does not fit the model."""
        shape = tuple(self.values.shape)
        if len(shape) >= 1 and shape[0] != num_layers:
            raise ValueError(
                f"budget has {shape[0]} per-layer entries but the model has {num_layers} layers"
            )
        if len(shape) == 2 and shape[1] != num_kv_heads:
            raise ValueError(
                f"budget has {shape[1]} per-head entries but the model has {num_kv_heads} KV "
                "heads (budgets are per KV head: GQA shares one cache among a group of query heads)"
            )

    def tokens(self, layer: int, num_kv_heads: int, context: int) -> Tensor:
        """Token budget of each KV head of ``layer``, ``[num_kv_heads]`` int64 (fractions are
        rounded up against ``context``, at least 1 token)."""
        if self.values.dim() >= 1 and not 0 <= layer < self.values.shape[0]:
            raise ValueError(
                f"budget has {self.values.shape[0]} per-layer entries; no entry for layer {layer}"
            )
        if self.values.dim() == 2:
            self.check(self.values.shape[0], num_kv_heads)
        values = self.values if self.values.dim() == 0 else self.values[layer]
        values = values.expand(num_kv_heads)
        if self.fraction:
            values = torch.ceil(values * context).clamp_min(1)
        return values.long()

    def __repr__(self) -> str:
        shown = self.values.tolist() if self.values.numel() <= 4 else f"{tuple(self.values.shape)}"
        return f"Budget({shown}{', fraction' if self.fraction else ''})"


@dataclass(frozen=True, repr=False)
class Pyramid(Budget):
    """PyramidKV's per-layer budgets ("PyramidKV: Dynamic KV Cache Compression based on
    Pyramidal Information Funneling", Cai et al., 2024): the ``average`` budget (``values``,
    tokens or a fraction of the context) minus ``reserved`` tokens every layer keeps anyway
    (SnapKV's observation window) is spread as an arithmetic sequence from the bottom layer
    (``2 * s - s / beta``) to the top (``s / beta``), ``s = average - reserved``; each layer then
    adds ``reserved``. More budget where attention is spread wide, less where it has funnelled
    onto a few tokens. Resolved when the context is known, so fractions work too."""

    num_layers: int = 1
    beta: float = 20.0
    reserved: int = 0

    def check(self, num_layers: int, num_kv_heads: int) -> None:
        if num_layers != self.num_layers:
            raise ValueError(
                f"pyramid budget was built for {self.num_layers} layers but the model has "
                f"{num_layers}"
            )

    def tokens(self, layer: int, num_kv_heads: int, context: int) -> Tensor:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"pyramid budget has {self.num_layers} layers; no layer {layer}")
        value = float(self.values)
        average = math.ceil(value * context) if self.fraction else int(value)
        selected = average - self.reserved
        if selected < 1:
            raise ValueError(
                f"pyramid budget: average {average} tokens leaves nothing beyond the "
                f"{self.reserved} every layer keeps; raise the budget"
            )
        top = selected / self.beta
        bottom = 2 * selected - top
        step = 0.0 if self.num_layers == 1 else (top - bottom) / (self.num_layers - 1)
        tokens = max(1, round(bottom + step * layer)) + self.reserved
        return torch.full((num_kv_heads,), tokens, dtype=torch.long)

    def __repr__(self) -> str:
        return (
            f"Pyramid(average={float(self.values)}, layers={self.num_layers}, beta={self.beta}, "
            f"reserved={self.reserved})"
        )


def pyramid(
    average: int | float, num_layers: int, beta: float = 20.0, reserved: int = 0
) -> Pyramid:
    """PyramidKV per-layer budgets with the given ``average`` (int tokens or a fraction of the
    context), of which ``reserved`` tokens per layer stay outside the pyramid (see
    ``Pyramid``)."""
    _check_value(average, "pyramid average")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if beta < 1:
        raise ValueError(f"beta must be >= 1 (top budget = average / beta), got {beta}")
    if reserved < 0:
        raise ValueError(f"reserved must be >= 0 tokens, got {reserved}")
    if isinstance(average, int) and average <= reserved:
        raise ValueError(
            f"pyramid average {average} tokens must exceed the {reserved} reserved per layer"
        )
    base = Budget.of(average)
    return Pyramid(base.values, base.fraction, num_layers, beta, reserved)
