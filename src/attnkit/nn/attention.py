"""``Attention``: one attention layer whose every part is chosen by name, as data.

    config = AttentionConfig(d_model=256, n_heads=8, n_kv_heads=2,
                             layout="gqa", mechanism="sliding_window", positional="rope",
                             gate="headwise")
    layer = Attention(config)
    y = layer(x)                                   # x [B, T, d_model] -> [B, T, d_model]

The parts, each a table lookup:

- ``layout`` (``attnkit.heads.LAYOUTS``): projections and how heads share keys/values
  (MHA/GQA/MQA, MLA, MoH, ...). It returns per-head outputs ``[B, T, Hq, Dv]``.
- ``mechanism`` (``attnkit.mechanisms``): what each head computes — mask, score function, fixed
  bias — or an explicit ``Attend``. Learnable biases are positional schemes, not mechanisms.
- ``positional`` (``POSITIONAL``): RoPE applied to q/k, or an additive bias (ALiBi, KERPLE,
  T5, learned relative) whose learnable tensors become parameters of this layer.
- ``gate`` (``attnkit.variants``): an optional sigmoid gate on the attention output
  (head-wise or element-wise, "Gated Attention for Large Language Models", Qiu et al., 2025).

Then ``o_proj`` maps ``Hq * Dv`` back to ``d_model``. A KV cache (``cache=``) wraps the
``Attend`` so layouts never see caching; positions continue from the cache's length.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import heads, linear, mechanisms, variants
from attnkit.attend import Attend
from attnkit.masks.base import Mask
from attnkit.nn.cache import Cache, CachedAttend, StatefulAttend
from attnkit.nn.linear import LinearAttend
from attnkit.nn.positional import POSITIONAL, Positional

#: ``name`` or ``(name, options)``: how every part of a layer is chosen.
Choice = str | tuple[str, Mapping[str, Any]]


def _split(choice: Choice) -> tuple[str, dict[str, Any]]:
    if isinstance(choice, str):
        return choice, {}
    name, options = choice
    return name, dict(options)


# -- the layer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionConfig:
    """Everything that defines an ``Attention`` layer, as plain data.

    Attributes:
        d_model: model width ``C``.
        n_heads: query heads ``Hq``.
        n_kv_heads: key/value heads (GQA); None = ``n_heads``.
        head_dim: ``D``; None = ``d_model // n_heads``.
        layout: a name of ``attnkit.heads.LAYOUTS``, or ``(name, options)``.
        mechanism: a catalog name (``attnkit list``) or ``(name, {})``; or an ``Attend``.
            Names of the linear/recurrent family (``attnkit.linear.MECHANISMS``) run as a
            ``LinearAttend``: chunked for training, recurrent for decoding.
        positional: a name of ``POSITIONAL`` or ``(name, options)``; or a ``Positional``
            (e.g. ``Positional(rotary=Rotary.from_hf_config(config))``).
        gate: None, ``"headwise"`` or ``"elementwise"``.
        backend: the ``attnkit.attention`` backend (``"auto"``).
        bias: whether projections carry biases.
    """

    d_model: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    layout: Choice = "gqa"
    mechanism: Choice | Attend = "causal"
    positional: Choice | Positional = "rope"
    gate: str | None = None
    backend: str = "auto"
    bias: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim


def mechanism_attend(choice: Choice | Attend, n_heads: int, backend: str = "auto") -> Attend:
    """The ``Attend`` for a catalog mechanism used inside a layer.

    Mechanisms whose mask is data of one batch (``Mask.data_dependent``: ``documents``,
    ``key_padding``) or whose bias carries learnable tensors (``relative_bias``) cannot be
    fixed at construction and are refused.
    """
    if isinstance(choice, Attend):
        return choice
    name, options = _split(choice)
    if options:
        raise ValueError(
            f"catalog mechanisms take no options (got {sorted(options)} for {name!r}); "
            "pass an attnkit.nn.Attend(mask=..., score=...) for a custom variant"
        )
    mechanism = mechanisms.get(name)
    if mechanism.kind != "attention":
        raise ValueError(
            f"mechanism {name!r} is a {mechanism.kind} ({mechanism.family}), not a mask, score "
            "and bias that a layer's heads compute; choose it with the layer's own option "
            "(layout=, positional=, gate=) or run it with attnkit.catalog.get(name)"
        )
    built = mechanism.build(mechanisms.InputSpec(Hq=n_heads))
    mask = built.get("mask")
    if mask is not None and mask.data_dependent:
        raise ValueError(
            f"mechanism {name!r} depends on the batch's data ({mask!r}); pass its mask per "
            "call (Attention(..., mask=...)) or through an Attend built for that batch"
        )
    bias = built.get("bias")
    if bias is not None and bias.parameters():
        raise ValueError(
            f"mechanism {name!r} has learnable tensors; use positional={name!r} so they "
            "become parameters of the layer"
        )
    return Attend(
        mask=mask,
        score=built.get("score"),
        bias=bias,
        backend=mechanism.backend or backend,
    )


def _positional(config: AttentionConfig, rotary_dim: int) -> Positional:
    if isinstance(config.positional, Positional):
        return config.positional
    name, options = _split(config.positional)
    if name not in POSITIONAL:
        raise ValueError(
            f"unknown positional scheme {name!r}; known schemes: {', '.join(POSITIONAL)}"
        )
    return POSITIONAL[name](config.n_heads, rotary_dim, **options)


def _linear_name(choice: Choice | Attend) -> str | None:
    """The linear-family name ``choice`` selects, or None."""
    if isinstance(choice, Attend):
        return None
    name, options = _split(choice)
    if name not in linear.MECHANISMS:
        return None
    if options:
        raise ValueError(f"linear mechanisms take no options here (got {sorted(options)})")
    return name


class Attention(nn.Module):
    """An attention layer built from an ``AttentionConfig``: ``x [B, T, C] -> [B, T, C]``.

    ``forward(x, positions=None, cache=None, layer=0, mask=None)``: ``positions`` int ``[T]``
    or ``[B, T]`` (default: continue from the cache, else ``arange(T)``); with ``cache``, this
    step's keys/values are appended under index ``layer`` and queries attend to everything
    cached (bottom-right aligned masks make decoding exact); ``mask`` (e.g. the batch's key
    padding, ``masks.keys(attention_mask.bool())``) is ANDed with the mechanism's mask.
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        self.config = config
        layout_name, layout_options = _split(config.layout)
        if layout_name not in heads.LAYOUTS:
            raise ValueError(
                f"unknown layout {layout_name!r}; known layouts: {', '.join(heads.LAYOUTS)}"
            )
        self.heads = heads.LAYOUTS[layout_name](
            d_model=config.d_model,
            n_heads=config.n_heads,
            head_dim=config.dim_per_head,
            **({"n_kv_heads": config.n_kv_heads} | layout_options),
        )
        # Rotary acts on the dims the layout rotates (MLA: only its decoupled rope part).
        self.positional = _positional(config, self.heads.rotary_dim)
        self.bias_parameters = nn.ParameterList(
            [] if self.positional.bias is None else self.positional.bias.parameters()
        )
        recurrent = _linear_name(config.mechanism)
        if recurrent is not None:
            if self.positional.bias is not None:
                raise ValueError(
                    f"{recurrent} has no score matrix to add a positional bias to; "
                    "use positional='rope' or 'none'"
                )
            self.attend = LinearAttend(
                recurrent, config.n_heads, config.kv_heads, config.dim_per_head
            )
        else:
            self.attend = self._softmax_attend(config)
        value_dim = getattr(self.heads, "value_dim", config.dim_per_head)
        self.gate = (
            None
            if config.gate is None
            else variants.OutputGate(config.d_model, config.n_heads, value_dim, kind=config.gate)
        )
        self.o_proj = nn.Linear(config.n_heads * value_dim, config.d_model, bias=config.bias)

    def _softmax_attend(self, config: AttentionConfig) -> Attend:
        """The catalog mechanism's ``Attend``, carrying the positional bias if there is one."""
        attend = mechanism_attend(config.mechanism, config.n_heads, config.backend)
        if self.positional.bias is None:
            return attend
        if attend.bias is not None:
            raise ValueError(
                f"mechanism already has a bias ({attend.bias!r}); "
                f"choose positional='none' or 'rope' with it"
            )
        return replace(attend, bias=self.positional.bias)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: Cache | None = None,
        layer: int = 0,
        mask: Mask | None = None,
    ) -> Tensor:
        T = x.shape[1]
        past = 0 if cache is None else cache.seen(layer)
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device)
        attend = self.attend
        if mask is not None and isinstance(attend, LinearAttend):
            raise ValueError(
                f"{attend.mechanism.name} takes no mask (its recurrence fixes what each token "
                "sees); pad on the right and ignore the padded outputs instead"
            )
        if mask is not None:
            attend = attend.with_options(mask=mask if attend.mask is None else attend.mask & mask)
        if cache is not None and isinstance(attend, LinearAttend):
            attend = StatefulAttend(attend, cache, layer)
        elif cache is not None:
            if not self.heads.supports_kv_cache:
                raise ValueError(
                    f"layout {type(self.heads).__name__} cannot decode with a KV cache (it "
                    "needs every head's scores or regroups heads per call); run it without one"
                )
            attend = CachedAttend(attend, cache, layer)
        out = self.heads(x, attend, self.positional.rotary, positions)
        if self.gate is not None:
            out = self.gate(x, out)
        return self.o_proj(out.flatten(2))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layout={c.layout!r}, mechanism={c.mechanism!r}, positional={c.positional!r}, "
            f"gate={c.gate!r}"
        )
