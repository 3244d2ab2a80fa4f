"""Mechanism records and their registry: what ``attnkit list``, the benchmarks, the tests and
``attnkit.nn`` read.

Each ``Mechanism`` says where it comes from (paper) and how to run it, in one of three kinds:

- ``attention``: ``build(spec)`` returns ``attnkit.attention`` keyword arguments (``mask``,
  ``score``, ``bias``) for inputs of the sizes in ``spec``;
- ``function``: its own function of ``(q, k, v)`` (``run(spec)``) and a readable reference
  (``reference(spec)``), for mechanisms that wrap or replace the attention call (RoPE, ACT,
  Music Transformer relative attention, linear attention);
- ``layer``: an ``nn.Module`` ``x [B, T, C] -> [B, T, C]`` (``layer(spec)``, with
  ``C = Hq * D``) for mechanisms that own projections (head layouts, gated outputs, GAAM).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit.backends import BACKENDS
from attnkit.call import AttentionCall

#: Family key -> catalog section it comes from.
FAMILIES: dict[str, str] = {
    "exact": "Exact kernels and execution (same output as dense softmax attention)",
    "score": "Score functions and normalisers",
    "positional": "Positional schemes (score biases and rotary embeddings)",
    "heads": "Head layouts (how heads share keys and values, route and mix)",
    "static sparse": "Static sparse patterns (masks)",
    "linear": "Linear and recurrent attention (fixed-size states, latent/agent tokens)",
    "analysis": "Analysis, interpretability and inference-time calibration",
}

#: The three ways a mechanism runs (see the module docstring).
KINDS = ("attention", "function", "layer")


@dataclass(frozen=True)
class InputSpec:
    """Sizes of one attention call: ``q [B, Tq, Hq, D]``, ``k``/``v`` ``[B, Tk, Hkv, D]``."""

    B: int = 1
    Tq: int = 256
    Tk: int = 256
    Hq: int = 4
    Hkv: int | None = None
    D: int = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @property
    def kv_heads(self) -> int:
        return self.Hq if self.Hkv is None else self.Hkv

    def make_inputs(
        self, seed: int = 0, requires_grad: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Seeded ``randn`` q, k, v of these sizes (drawn in float32, then cast)."""
        g = torch.Generator().manual_seed(seed)

        def draw(T: int, H: int) -> Tensor:
            x = torch.randn(self.B, T, H, self.D, generator=g).to(self.dtype).to(self.device)
            return x.requires_grad_(requires_grad)

        return draw(self.Tq, self.Hq), draw(self.Tk, self.kv_heads), draw(self.Tk, self.kv_heads)


@dataclass(frozen=True)
class Mechanism:
    """A named mechanism of the catalog.

    Attributes:
        name: registry key (``attnkit list``, ``attnkit bench --mechanisms``).
        family: a key of ``FAMILIES``.
        paper: title, authors and year of the paper it comes from.
        summary: one line on what it computes here.
        build: kind ``attention``: ``build(spec) -> dict`` of ``attnkit.attention`` keyword
            arguments (``mask``/``score``/``bias``) for inputs of the sizes in ``spec``. Every
            call builds fresh objects; masks equal to earlier ones share their caches
            (``Mask.identity``) unless built inside ``attnkit.masks.base.private_caches()``.
        backend: the backend the mechanism is defined by, if any (e.g. the memory-efficient
            chunked algorithm); None means ``"auto"``.
        run: kind ``function``: ``run(spec) -> fn`` with ``fn(q, k, v) -> [B, Tq, Hq, Dv]``.
        reference: kind ``function``: ``reference(spec) -> fn``, the readable form of ``run``.
        layer: kind ``layer``: ``layer(spec) -> nn.Module`` mapping ``x [B, Tq, Hq * D]`` to
            the same shape (``spec.kv_heads`` and ``spec.D`` set its heads and head size).
        cross: False if the mechanism needs ``Tq == Tk`` (self-attention over one sequence,
            e.g. the recurrent family).
    """

    name: str
    family: str
    paper: str
    summary: str
    build: Callable[[InputSpec], dict[str, Any]] | None = None
    backend: str | None = None
    run: Callable[[InputSpec], Callable[[Tensor, Tensor, Tensor], Tensor]] | None = None
    reference: Callable[[InputSpec], Callable[[Tensor, Tensor, Tensor], Tensor]] | None = None
    layer: Callable[[InputSpec], Any] | None = None
    cross: bool = True

    @property
    def kind(self) -> str:
        """``attention``, ``function`` or ``layer``."""
        if self.build is not None:
            return "attention"
        return "function" if self.run is not None else "layer"


MECHANISMS: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    """Add ``mechanism`` to ``MECHANISMS`` (names are unique). Returns it."""
    if mechanism.name in MECHANISMS:
        raise ValueError(f"a mechanism named {mechanism.name!r} is already registered")
    given = [f for f in ("build", "run", "layer") if getattr(mechanism, f) is not None]
    if len(given) != 1:
        raise ValueError(
            f"{mechanism.name!r} must define exactly one of build (attention kwargs), run (a "
            f"function of q, k, v) or layer (an nn.Module); it defines {given or 'none'}"
        )
    if (mechanism.run is None) != (mechanism.reference is None):
        raise ValueError(f"{mechanism.name!r}: a function mechanism needs both run and reference")
    if mechanism.family not in FAMILIES:
        raise ValueError(
            f"unknown family {mechanism.family!r} for {mechanism.name!r}; "
            f"use one of: {', '.join(FAMILIES)}"
        )
    MECHANISMS[mechanism.name] = mechanism
    return mechanism


def get(name: str) -> Mechanism:
    """The mechanism called ``name``; ``KeyError`` lists the known names. ``"a+b"`` composes
    attention mechanisms (``sigmoid+sliding_window``, see ``compose``)."""
    if "+" in name:
        return compose(*(get(part) for part in name.split("+")))
    try:
        return MECHANISMS[name]
    except KeyError:
        raise KeyError(
            f"no mechanism named {name!r}; known mechanisms: {', '.join(sorted(MECHANISMS))}"
        ) from None


def compose(*parts: Mechanism) -> Mechanism:
    """One attention mechanism from several: their masks ANDed, the score function and the
    bias of whichever part has one (two parts with a score, or with a bias, are refused)."""
    for part in parts:
        if part.kind != "attention":
            raise ValueError(
                f"only attention mechanisms compose; {part.name!r} is a {part.kind} mechanism"
            )
    backends = {part.backend for part in parts} - {None}
    if len(backends) > 1:
        raise ValueError(f"the parts are defined by different backends: {sorted(backends)}")

    def build(spec: InputSpec) -> dict[str, Any]:
        built = [part.build(spec) for part in parts]
        options: dict[str, Any] = {}
        for option in ("score", "bias"):
            given = [b[option] for b in built if b.get(option) is not None]
            if len(given) > 1:
                names = [p.name for p, b in zip(parts, built, strict=True) if b.get(option)]
                raise ValueError(f"{' and '.join(names)} both set a {option}; compose one")
            if given:
                options[option] = given[0]
        masks = [b["mask"] for b in built if b.get("mask") is not None]
        if masks:
            options["mask"] = functools.reduce(operator.and_, masks)
        return options

    return Mechanism(
        name="+".join(part.name for part in parts),
        family=parts[-1].family,
        paper="; ".join(part.paper for part in parts),
        summary=" and ".join(part.summary for part in parts),
        build=build,
        backend=backends.pop() if backends else None,
    )


def backends_for(mechanism: Mechanism, grad: bool = False) -> list[str]:
    """Backends whose ``supports`` accepts ``mechanism`` on a small float32 call here
    (``B=1, T=256, H=4, D=64``), with inputs that require grad when ``grad`` is True.
    Function and layer mechanisms run their own code (through ``auto`` where they call
    ``attnkit.attention``): the list is empty for them."""
    if mechanism.kind != "attention":
        return []
    spec = InputSpec()
    q, k, v = spec.make_inputs(requires_grad=grad)
    # Forward-only use runs under no_grad, which also hides learnable bias parameters.
    with torch.enable_grad() if grad else torch.no_grad():
        call = AttentionCall(q, k, v, **mechanism.build(spec))
        return [name for name, backend in BACKENDS.items() if backend.supports(call) is None]
