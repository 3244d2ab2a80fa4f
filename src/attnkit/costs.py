"""Cost tables: what ``backend="auto"`` knows of each backend's speed on one device.

Every number is a time relative to one dense SDPA call of the same shape, dtype and grad mode
on the same device, so a table carries over between shapes: an estimate is a backend's time per
computed (q, k) pair (``per_live``) times the pairs its tiles cover, plus what its partial tiles,
score function and fixed costs add. Entries are keyed ``(name, dtype, grad)``; ``"*"`` stands
for any dtype and ``None`` for either grad mode.

Tables come from three places:

- **measured** on the device that runs (``attnkit.calibration``: seconds, once per
  machine, cached): the entries of ``MEASURED_ENTRIES``, per dtype and grad mode;
- **conservative** (``ATTNKIT_CALIBRATION=off``): SDPA is assumed fastest per computed pair,
  so ``auto`` leaves SDPA only for masks that skip enough tiles to pay for it;
- **given**: tests inject tables for machines they do not run on (``attnkit.calibration.using``).

Entries a table lacks fall back to ``FACTORS``: ratios that describe an algorithm rather than a
machine (a score function's extra work, a partial tile's extra pass), fitted with
``attnkit bench`` and ``attnkit bench sparse`` (see docs/dispatch.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from attnkit.machine import Capabilities

#: ``(name, dtype, grad)``: dtype a torch dtype's name or ``"*"``, grad a bool or None (either).
Key = tuple[str, str, "bool | None"]

#: The entries a calibration measures, per dtype and grad mode, and what each means.
MEASURED_ENTRIES = {
    "sdpa.causal_edge": "SDPA is_causal costs 0.5 + edge / T of dense (its diagonal blocks)",
    "sdpa.mask": "SDPA with a dense boolean mask, relative to dense",
    "sdpa.bias": "SDPA with a float mask (an additive bias and the mask), relative to dense",
    "flex.per_live": "FlexAttention per live 128x128 tile with a sparse mask",
    "flex.score": "FlexAttention with a score function (sigmoid), over softmax",
    "flex.bias": "FlexAttention with an additive bias (ALiBi), over softmax",
    "chunked.dense": "chunked without a mask (one long piece per query block)",
    "chunked.per_live": "chunked per live tile with a mask (causal)",
    "chunked.score": "chunked with a score function (sigmoid), over softmax",
    "chunked.bias": "chunked with an additive bias (ALiBi), over softmax",
    "chunked.overhead_pairs": "chunked's fixed cost per call, as pairs dense SDPA computes",
    "flex.overhead_pairs": "FlexAttention's fixed cost per call, as pairs dense SDPA computes",
    "blocksparse.per_live": "blocksparse per live tile (the implementation that runs here)",
    "blocksparse.score.sigmoid": "the block-sparse kernel with sigmoid weights, over softmax",
    "blocksparse.score.softplus_l1": "the block-sparse kernel with softplus-l1, over softmax",
    "blocksparse.bias": "the block-sparse kernel with an offset bias (ALiBi), over softmax",
}

#: Algorithmic ratios, the same on every machine to the precision ``auto`` needs, and the
#: fallback of every measured entry (fitted on a 2-core AVX-512 CPU with AVX512-BF16).
FACTORS: dict[Key, float] = {
    ("sdpa.causal_edge", "*", None): 224.0,
    ("sdpa.mask", "*", None): 1.1,
    # an additive bias goes into SDPA as a float mask (with the mask's -inf), never is_causal
    ("sdpa.bias", "*", False): 1.5,
    ("sdpa.bias", "*", True): 1.2,
    ("flex.per_live", "*", None): 1.35,
    ("flex.per_live", "bfloat16", None): 1.75,
    ("flex.per_live", "float16", None): 1.75,
    # without a mask FlexAttention runs its dense path, slower per tile than with a sparse mask
    ("flex.dense", "*", None): 2.5,
    # a score function other than plain softmax, or an additive bias, per tile
    ("flex.score", "*", None): 1.3,
    ("flex.bias", "*", None): 1.3,
    # grid masks (neighborhoods) evaluate index arithmetic per pair in partial tiles
    ("flex.grid_partial", "*", None): 3.5,
    # fixed cost per call on the CPU (guards, BlockMask, the kernel's launch over its tiles), as
    # the (query x key) pairs dense SDPA computes in that time (the timings it was fitted to:
    # docs/dispatch.md, "Measurements behind the factors")
    ("flex.overhead_pairs", "*", None): 1.5e6,
    ("chunked.per_live", "*", False): 1.8,
    ("chunked.per_live", "*", True): 2.8,
    ("chunked.dense", "*", False): 1.8,
    ("chunked.dense", "*", True): 2.8,
    # a score function or bias computed in plain PyTorch, per tile
    ("chunked.score", "*", None): 2.0,
    ("chunked.bias", "*", None): 2.0,
    # its Python loop over query blocks and pieces
    ("chunked.overhead_pairs", "*", None): 2e5,
    ("blocksparse.per_live", "*", None): 1.2,
    ("blocksparse.per_live", "float32", False): 0.48,
    ("blocksparse.per_live", "float32", True): 0.51,
    ("blocksparse.per_live", "bfloat16", False): 0.27,
    ("blocksparse.per_live", "bfloat16", True): 0.45,
    ("blocksparse.per_live", "float16", None): 20.0,
    ("blocksparse.partial", "*", None): 0.6,
    ("blocksparse.partial", "bfloat16", None): 0.45,
    # the soft cap's tanh on every score, per tile
    ("blocksparse.softcap", "*", None): 1.75,
    ("blocksparse.softcap", "bfloat16", None): 2.2,
    # where not measured (ATTNKIT_CALIBRATION=off, a failed step): a score function's weights in
    # the compiled kernel against softmax's (sigmoid: a reciprocal per pair; softplus-l1: an exp
    # and a log1p), and an offset bias (one table read per pair)
    ("blocksparse.score.sigmoid", "*", None): 1.2,
    ("blocksparse.score.softplus_l1", "*", None): 2.0,
    # per pass of Cog's two (the caller counts the passes): softmax over |s|, shifted
    ("blocksparse.score.cog", "*", None): 1.1,
    ("blocksparse.bias", "*", None): 1.2,
    # fixed cost per call, as the (query x key) pairs dense SDPA computes in that time
    ("blocksparse.overhead_pairs", "*", None): 0.5e5,
}

#: Per-pair cost charged by the conservative table to every backend but SDPA: unmeasured, a
#: backend is taken to be this much slower than SDPA on each tile it computes.
CONSERVATIVE_PER_LIVE = 1.5


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CostTable:
    """What ``auto`` knows of one device: its ``capabilities``, the ``entries`` (measured or
    given; ``FACTORS`` fill the rest) and where they come from (``source``)."""

    capabilities: Capabilities
    source: str
    entries: Mapping[Key, float] = field(default_factory=dict)

    def value(self, name: str, dtype: torch.dtype | str, grad: bool) -> float:
        """The entry ``name`` for ``dtype`` and grad mode: the most specific of this table's
        entries, else of ``FACTORS``."""
        dtype = dtype if isinstance(dtype, str) else dtype_name(dtype)
        for table in (self.entries, FACTORS):
            for key in (
                (name, dtype, grad),
                (name, dtype, None),
                (name, "*", grad),
                (name, "*", None),
            ):
                if key in table:
                    return table[key]
        raise KeyError(f"no cost entry {name!r} for {dtype}, grad={grad}")

    def measured(self, name: str, dtype: torch.dtype | str, grad: bool) -> bool:
        """True if this table has its own entry ``name`` for ``dtype`` and grad mode."""
        dtype = dtype if isinstance(dtype, str) else dtype_name(dtype)
        return (name, dtype, grad) in self.entries

    @property
    def conservative(self) -> bool:
        return self.source.startswith("conservative")

    def rows(self) -> list[tuple[str, str, bool | None, float]]:
        """This table's own entries, sorted, as ``(name, dtype, grad, value)``."""
        items = sorted(
            self.entries.items(), key=lambda item: (item[0][0], item[0][1], str(item[0][2]))
        )
        return [(*key, value) for key, value in items]


def conservative_table(capabilities: Capabilities) -> CostTable:
    """The table without measurements: SDPA as measured nowhere, every other backend
    ``CONSERVATIVE_PER_LIVE`` times SDPA per computed tile and with no discount for its own
    kernels, so dense and causal attention stay on SDPA."""
    entries: dict[Key, float] = {}
    for name in ("flex.per_live", "chunked.per_live", "chunked.dense", "blocksparse.per_live"):
        for dtype in ("*", "float32", "bfloat16", "float16"):
            for grad in (None, False, True):
                default = FACTORS.get((name, dtype, grad))
                if default is not None or (dtype, grad) == ("*", None):
                    entries[name, dtype, grad] = max(CONSERVATIVE_PER_LIVE, default or 0.0)
    return CostTable(capabilities, "conservative (ATTNKIT_CALIBRATION=off)", entries)
