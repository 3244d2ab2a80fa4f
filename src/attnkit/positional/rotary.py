"""Rotary position embedding (RoPE) and its context-extension scalings.

"RoFormer: Enhanced Transformer with Rotary Position Embedding" (Su, Lu, Pan, Murtadha, Wen,
Liu, 2021): the rotary dims of ``q`` and ``k`` are split into 2-D pairs, and pair ``i`` of the
token at position ``m`` is rotated by the angle ``m θ_i``, ``θ_i = base^(-2i/d)`` (``d`` the
rotary dim). A rotation is orthogonal, so ``<R_m q, R_n k> = <q, R_(n-m) k>`` depends on
positions only through ``n - m``.

Scalings change the frequencies (and, for YaRN, the magnitude) to stretch a model's context;
``Rotary(..., scaling=...)`` takes one of ``SCALINGS``:

| scaling | paper | frequencies | magnitude |
|---|---|---|---|
| ``LinearScaling(s)`` | Chen et al., 2023 (interpolation) | ``θ_i / s`` | 1 |
| ``NTKScaling(s)`` | bloc97, 2023 (YaRN paper §3.1) | base ``b s^(d/(d-2))`` | 1 |
| ``DynamicNTKScaling(s, L)`` | emozilla, 2023 (YaRN §3.3) | NTK at the call's length | 1 |
| ``YaRNScaling(s, L, ...)`` | Peng et al., 2023 | per-frequency ramp | ``0.1 ln s + 1`` |

The layout of pairs follows Hugging Face Llama by default ("rotate_half": pair ``i`` is dims
``(i, i + d/2)``); ``interleaved=True`` pairs ``(2i, 2i + 1)`` as in RoFormer and GPT-J.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor


def base_frequencies(dim: int, base: float) -> Tensor:
    """RoFormer's ``θ_i = base^(-2i/dim)`` for ``i < dim/2``: float64 ``[dim/2]``."""
    return base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _check_factor(factor: float) -> None:
    if not factor >= 1:
        raise ValueError(f"RoPE scaling factor must be >= 1 (1 = no scaling), got {factor}")


def _check_original_length(length: int) -> None:
    if not (isinstance(length, int) and length > 0):
        raise ValueError(f"original_max_position must be a positive int, got {length!r}")


@dataclass(frozen=True)
class LinearScaling:
    """Position interpolation: positions ``m -> m / factor``, i.e. ``θ_i -> θ_i / factor``.

    "Extending Context Window of Large Language Models via Positional Interpolation" (Chen,
    Wong, Chen, Tian, 2023). ``factor = 1`` is plain RoPE (tested).
    """

    factor: float
    length_dependent: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_factor(self.factor)

    def frequencies(self, dim: int, base: float, seq_len: int | None) -> tuple[Tensor, float]:
        """``(θ [dim/2] float64, magnitude)`` for a rotary dim ``dim``."""
        return base_frequencies(dim, base) / self.factor, 1.0


@dataclass(frozen=True)
class NTKScaling:
    """NTK-aware scaling: the base grows to ``base * factor^(d/(d-2))``, which leaves the
    highest frequency unchanged and divides the lowest by ``factor``.

    Proposed by bloc97 (2023); written up in "YaRN: Efficient Context Window Extension of Large
    Language Models" (Peng, Quesnelle, Fan, Shippole, 2023), §3.1. ``factor = 1`` is plain RoPE.
    """

    factor: float
    length_dependent: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_factor(self.factor)

    def frequencies(self, dim: int, base: float, seq_len: int | None) -> tuple[Tensor, float]:
        return base_frequencies(dim, base * self.factor ** (dim / (dim - 2))), 1.0


@dataclass(frozen=True)
class DynamicNTKScaling:
    """Dynamic NTK: NTK-aware scaling whose factor follows the sequence length ``L`` of the
    call, ``base * (factor L / L0 - (factor - 1))^(d/(d-2))`` for ``L > L0`` and plain RoPE for
    ``L <= L0`` (``L0 = original_max_position``), as Hugging Face's ``"dynamic"`` rope type.

    emozilla (2023); "YaRN" (Peng et al., 2023), §3.3. ``L`` is the largest position of the call
    plus one, so every call is a pure function of its inputs (Hugging Face instead keeps the
    frequencies of the longest sequence seen so far). As in every dynamic scaling, keys cached
    at one length and queries rotated at another see slightly different frequencies.
    """

    factor: float
    original_max_position: int
    length_dependent: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_factor(self.factor)
        _check_original_length(self.original_max_position)

    def frequencies(self, dim: int, base: float, seq_len: int | None) -> tuple[Tensor, float]:
        length = max(seq_len or 0, self.original_max_position)
        stretch = self.factor * length / self.original_max_position - (self.factor - 1)
        return base_frequencies(dim, base * stretch ** (dim / (dim - 2))), 1.0


def _yarn_magnitude(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class YaRNScaling:
    """YaRN: per-frequency interpolation plus an attention temperature.

    "YaRN: Efficient Context Window Extension of Large Language Models" (Peng, Quesnelle, Fan,
    Shippole, 2023). A pair that turns fewer than ``beta_slow`` times over the original length
    ``L0`` is interpolated (``θ_i / factor``), one that turns more than ``beta_fast`` times is
    kept, and the pairs between follow a linear ramp over the pair index (the bounds rounded
    outwards when ``truncate``). ``cos`` and ``sin`` are multiplied by the magnitude
    ``attention_factor`` (default ``0.1 ln(factor) + 1``, or the DeepSeek ratio
    ``mscale / mscale_all_dim`` form when both are given), so ``q·k`` is scaled by its square,
    the paper's ``1/t``. As Hugging Face's ``"yarn"`` rope type; ``factor = 1`` is plain RoPE.
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    length_dependent: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_factor(self.factor)
        _check_original_length(self.original_max_position)
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(
                f"YaRN needs beta_fast > beta_slow > 0, got beta_fast={self.beta_fast}, "
                f"beta_slow={self.beta_slow}"
            )

    def magnitude(self) -> float:
        """The factor applied to ``cos`` and ``sin``."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_magnitude(self.factor, self.mscale) / _yarn_magnitude(
                self.factor, self.mscale_all_dim
            )
        return _yarn_magnitude(self.factor)

    def frequencies(self, dim: int, base: float, seq_len: int | None) -> tuple[Tensor, float]:
        def pair_turning(turns: float) -> float:
            # The (fractional) pair index whose wavelength fits `turns` times into L0.
            wavelengths = self.original_max_position / (turns * 2 * math.pi)
            return dim * math.log(wavelengths) / (2 * math.log(base))

        low, high = pair_turning(self.beta_fast), pair_turning(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a one-pair ramp would divide by zero
        pair = torch.arange(dim // 2, dtype=torch.float64)
        interpolated = ((pair - low) / (high - low)).clamp(0, 1)
        theta = base_frequencies(dim, base)
        theta = theta / self.factor * interpolated + theta * (1 - interpolated)
        return theta, self.magnitude()


#: The scalings ``Rotary`` accepts, by the name Hugging Face configs use.
SCALINGS: dict[str, type] = {
    "linear": LinearScaling,
    "ntk": NTKScaling,
    "dynamic": DynamicNTKScaling,
    "yarn": YaRNScaling,
}

Scaling = LinearScaling | NTKScaling | DynamicNTKScaling | YaRNScaling


# -- pair layouts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the two coordinates of each rotated pair live among the rotary dims."""

    split: Callable[[Tensor], tuple[Tensor, Tensor]]
    join: Callable[[Tensor, Tensor], Tensor]
    pairs: Callable[[int], tuple[Tensor, Tensor]]  # (first, second) dim index of each pair


LAYOUTS: dict[str, Layout] = {
    "half": Layout(
        split=lambda x: x.chunk(2, dim=-1),
        join=lambda a, b: torch.cat([a, b], dim=-1),
        pairs=lambda d: (torch.arange(d // 2), torch.arange(d // 2) + d // 2),
    ),
    "interleaved": Layout(
        split=lambda x: x.unflatten(-1, (-1, 2)).unbind(-1),
        join=lambda a, b: torch.stack([a, b], dim=-1).flatten(-2),
        pairs=lambda d: (torch.arange(0, d, 2), torch.arange(1, d, 2)),
    ),
}


# -- the rotary embedding --------------------------------------------------------------------


@dataclass(frozen=True)
class Rotary:
    """RoPE for ``[B, T, H, D]`` tensors: ``rotary(x, positions) -> [B, T, H, D]``.

    Su et al. (2021), "RoFormer: Enhanced Transformer with Rotary Position Embedding"; see the
    module docstring for the scalings and layouts.

    Attributes:
        head_dim: ``D``, the last dim of the tensors it rotates.
        rotary_dim: the first ``rotary_dim`` dims rotate (even, <= ``head_dim``; default all),
            the rest pass through unchanged (partial rotary, GPT-NeoX / Phi).
        base: ``θ_i = base^(-2i / rotary_dim)``.
        scaling: one of ``SCALINGS`` (None = plain RoPE).
        interleaved: pairs ``(2i, 2i+1)`` (RoFormer, GPT-J) instead of ``(i, i + d/2)`` (Llama).

    Contract for layers: rotate queries and keys separately with the positions of their own
    tokens, ``q = rotary(q, q_positions)``, ``k = rotary(k, k_positions)`` (``q [B, Tq, Hq, D]``
    and ``k [B, Tk, Hkv, D]`` may differ in length and heads), before ``attnkit.attention``;
    a KV cache stores keys already rotated. Positions are ints ``[T]`` (shared by the batch) or
    ``[B, T]`` (e.g. left padding); ``None`` means ``0..T-1``. The cos/sin tables are computed
    in float64, cast once to the input dtype and cached per device, dtype and length.
    """

    head_dim: int
    rotary_dim: int | None = None
    base: float = 10000.0
    scaling: Scaling | None = None
    interleaved: bool = False
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if not (isinstance(self.head_dim, int) and self.head_dim > 0):
            raise ValueError(f"head_dim must be a positive int, got {self.head_dim!r}")
        rd = self.rotary_dim
        if not (isinstance(rd, int) and 2 <= rd <= self.head_dim and rd % 2 == 0):
            raise ValueError(
                f"rotary_dim must be an even int in [2, head_dim={self.head_dim}], got {rd!r}"
            )
        if not (self.base > 0 and self.base != 1):
            raise ValueError(f"base must be > 0 and != 1, got {self.base}")
        if self.scaling is not None and not isinstance(self.scaling, tuple(SCALINGS.values())):
            raise TypeError(
                f"scaling must be one of {', '.join(s.__name__ for s in SCALINGS.values())} "
                f"(or None), got {type(self.scaling).__name__}"
            )

    @property
    def layout(self) -> str:
        """Key of ``LAYOUTS``."""
        return "interleaved" if self.interleaved else "half"

    def frequencies(self, seq_len: int | None = None) -> tuple[Tensor, float]:
        """``(θ, magnitude)``: float64 ``[rotary_dim / 2]`` frequencies on the CPU and the factor
        ``cos``/``sin`` are multiplied by. ``seq_len`` matters only for dynamic NTK."""
        if self.scaling is None:
            return base_frequencies(self.rotary_dim, self.base), 1.0
        return self.scaling.frequencies(self.rotary_dim, self.base, seq_len)

    def cos_sin(
        self,
        length: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seq_len: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``magnitude * cos(m θ_i)``, ``magnitude * sin(m θ_i)`` for positions ``m < length``:
        two ``[length, rotary_dim / 2]`` tensors (cached)."""
        key = (length, str(device), dtype, seq_len)
        if key not in self._tables:
            if len(self._tables) > 8:
                self._tables.clear()
            theta, magnitude = self.frequencies(seq_len)
            angles = torch.arange(length, dtype=torch.float64).unsqueeze(-1) * theta
            self._tables[key] = tuple(
                (magnitude * f(angles)).to(device=device, dtype=dtype)
                for f in (torch.cos, torch.sin)
            )
        return self._tables[key]

    def __call__(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """Rotate ``x [B, T, H, D]`` at ``positions`` (``[T]`` or ``[B, T]`` ints; default
        ``0..T-1``). Returns ``[B, T, H, D]`` in ``x``'s dtype."""
        positions, top = self._positions(x, positions)
        if top is None:
            cos, sin = self._cos_sin_at(positions, x.device, x.dtype)
        else:
            seq_len = top if self._length_dependent else None
            # Tables grow in powers of two so that decoding step by step reuses one table.
            length = top if self._length_dependent else 1 << max(top - 1, 1).bit_length()
            cos, sin = self.cos_sin(length, x.device, x.dtype, seq_len)
            cos, sin = cos[positions], sin[positions]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B|1, T, 1, d/2]
        layout = LAYOUTS[self.layout]
        x1, x2 = layout.split(x[..., : self.rotary_dim])
        rotated = layout.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
        return torch.cat([rotated, x[..., self.rotary_dim :]], dim=-1)

    def _cos_sin_at(
        self, positions: Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """``cos_sin``'s rows at ``positions [B|1, T]``, computed from the angles of those
        positions alone (the same float64 math as the tables)."""
        theta, magnitude = self.frequencies()
        angles = positions.to(torch.float64).unsqueeze(-1) * theta.to(device)
        return tuple((magnitude * f(angles)).to(dtype) for f in (torch.cos, torch.sin))

    @property
    def _length_dependent(self) -> bool:
        return self.scaling is not None and self.scaling.length_dependent

    def _positions(self, x: Tensor, positions: Tensor | None) -> tuple[Tensor, int | None]:
        """Positions as ``[B|1, T]`` int64 on ``x``'s device and the largest one plus one
        (None inside a compiled graph, where it is data)."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != self.head_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"rotary expects x [B, T, H, D] with D = head_dim = {self.head_dim}, got {shape}"
            )
        B, T = x.shape[:2]
        if positions is None:
            return torch.arange(T, device=x.device).unsqueeze(0), T
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
        if positions.shape not in ((T,), (B, T)):
            raise ValueError(
                f"positions must be [T] = [{T}] or [B, T] = [{B}, {T}] for x of shape "
                f"{tuple(x.shape)}, got {tuple(positions.shape)}"
            )
        if positions.numel() == 0:
            return positions.view(1, 0).long().to(x.device), 1
        if torch.compiler.is_compiling():
            # A graph cannot read the largest position (data); ``__call__`` computes the
            # angles of these positions instead of indexing a table.
            if self._length_dependent:
                raise ValueError(
                    f"{type(self.scaling).__name__} rescales by the largest position, which a "
                    "compiled graph cannot read from the positions tensor; compile without "
                    "positions (0..T-1) or run this rotary eagerly"
                )
            return positions.long().to(x.device).view(-1, T), None
        lo, hi = (int(t) for t in torch.aminmax(positions))
        if lo < 0:
            raise ValueError(f"positions must be >= 0, got a minimum of {lo}")
        return positions.long().to(x.device).view(-1, T), hi + 1

    @classmethod
    def from_hf_config(
        cls, config: Any, *, layer_type: str | None = None, interleaved: bool = False
    ) -> Rotary:
        """The ``Rotary`` of a Hugging Face transformers config (Llama-style).

        Reads ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta``
        (older configs), ``partial_rotary_factor`` and ``head_dim`` (else ``hidden_size //
        num_attention_heads``). Rope types: ``default``, ``linear``, ``dynamic``, ``yarn``.
        Configs with one rope per layer type (e.g. Gemma 3) need ``layer_type``.
        """
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        params = dict(params or {})
        nested = [key for key, value in params.items() if isinstance(value, dict)]
        if layer_type is not None:
            if layer_type not in nested:
                raise ValueError(
                    f"config has no rope parameters for layer type {layer_type!r}; "
                    f"it has: {', '.join(nested) or 'one set for all layers'}"
                )
            params = dict(params[layer_type])
        elif nested:
            raise ValueError(
                f"config has one rope per layer type ({', '.join(nested)}); "
                "pass layer_type= to choose one"
            )
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in HF_ROPE_TYPES:
            raise ValueError(
                f"rope type {rope_type!r} is not supported; supported: {', '.join(HF_ROPE_TYPES)}"
            )
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        fraction = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1))
        return cls(
            head_dim=head_dim,
            rotary_dim=int(head_dim * (fraction or 1.0)),
            base=float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            scaling=HF_ROPE_TYPES[rope_type](params, config),
            interleaved=interleaved,
        )


def _hf_yarn(params: dict, config: Any) -> YaRNScaling:
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", config.max_position_embeddings
    )
    return YaRNScaling(
        factor=params.get("factor") or config.max_position_embeddings / original,
        original_max_position=int(original),
        beta_fast=params.get("beta_fast") or 32.0,
        beta_slow=params.get("beta_slow") or 1.0,
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=params.get("truncate", True),
    )


#: Hugging Face ``rope_type`` -> this module's scaling, from (rope parameters, config).
HF_ROPE_TYPES: dict[str, Callable[[dict, Any], Scaling | None]] = {
    "default": lambda params, config: None,
    "linear": lambda params, config: LinearScaling(params["factor"]),
    "dynamic": lambda params, config: DynamicNTKScaling(
        params["factor"], config.max_position_embeddings
    ),
    "yarn": _hf_yarn,
}


def rotary_reference(rotary: Rotary, x: Tensor, positions: Tensor | None = None) -> Tensor:
    """RoFormer's equation read literally: ``x_rot[m] -> R_(Θ, m) x_rot[m]`` with ``R`` the
    block-diagonal matrix of 2×2 rotations by ``m θ_i`` (times the scaling's magnitude), built
    explicitly as ``[B|1, T, d, d]`` in float64; the dims past ``rotary_dim`` pass through.
    ``x [B, T, H, D]`` -> ``[B, T, H, D]``. Slow; the oracle for ``Rotary.__call__``."""
    positions, top = rotary._positions(x, positions)
    theta, magnitude = rotary.frequencies(top if rotary._length_dependent else None)
    angles = positions.cpu().double().unsqueeze(-1) * theta  # [B|1, T, d/2]
    d = rotary.rotary_dim
    first, second = LAYOUTS[rotary.layout].pairs(d)
    R = torch.zeros(*angles.shape[:-1], d, d, dtype=torch.float64)
    R[..., first, first] = torch.cos(angles)
    R[..., first, second] = -torch.sin(angles)
    R[..., second, first] = torch.sin(angles)
    R[..., second, second] = torch.cos(angles)
    R = (magnitude * R).to(device=x.device, dtype=x.dtype)
    rotated = torch.einsum("btij,bthj->bthi", R, x[..., :d])
    return torch.cat([rotated, x[..., d:]], dim=-1)
