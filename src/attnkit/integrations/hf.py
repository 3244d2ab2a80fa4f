"""Hugging Face transformers integration: attnkit mechanisms as attention implementations.

    from attnkit.integrations import hf
    hf.register("attnkit")                                   # exact attention
    hf.register("attnkit-streaming", mask=masks.sinks(4) | masks.sliding_window(255))
    hf.register("attnkit-sigmoid", score=scores.sigmoid())
    model.set_attn_implementation("attnkit-streaming")

    with hf.capture(key_sums=slice(-32, None)) as record:    # attention statistics
        model(**batch)
    record.stats[layer_idx][0].key_sums                      # [B, Hq, Tk]

``register`` installs two functions under one name, as transformers requires: an attention
function (``AttentionInterface``) and a mask function (``AttentionMaskInterface``). Without the
mask function transformers would hand the attention function its own mask format (or ``None``)
and padding would be silently lost. The mask function turns transformers' mask description
into an ``attnkit.masks.Mask``: it evaluates transformers' own mask function on the index
grid, and uses an analytic pattern (causal, full or sliding window, each with the 2-D padding
mask as ``masks.keys``) only when that pattern reproduces the evaluated matrix exactly;
otherwise it uses the matrix itself (``masks.from_dense``). So the result is always the mask
the model asked for; the analytic pattern only makes it faster.

Needs ``transformers`` (``pip install attnkit[hf]``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import catalog, masks, scores
from attnkit.api import attention
from attnkit.call import Aux, AuxOutput
from attnkit.masks.base import Mask
from attnkit.nn import Attend, Attention, AttentionConfig, Positional
from attnkit.positional import Bias, Rotary
from attnkit.scores import ScoreFunction

#: Keyword arguments transformers passes that change what attention computes, and how each is
#: honoured. Anything in ``UNSUPPORTED`` raises instead of being ignored.
UNSUPPORTED = {
    "s_aux": "learned sink logits (gpt-oss) are not supported by attnkit's HF integration yet",
    "position_bias": "T5-style position_bias tensors are not supported; use attnkit.positional",
    "head_mask": "head_mask is not supported; mask heads in the model instead",
}


@dataclass(frozen=True)
class Implementation:
    """What a registered name computes: the model's own mask, ANDed with ``mask``, with
    ``score`` and ``bias``; or, with ``mechanism``, what that catalog entry builds for the
    call's sizes (its mask ANDed with the model's)."""

    mask: Mask | None = None
    score: ScoreFunction | None = None
    bias: Bias | None = None
    mechanism: str | None = None
    backend: str = "auto"

    def options(self, B: int, Tq: int, Tk: int, Hq: int, Hkv: int, D: int) -> dict[str, Any]:
        if self.mechanism is None:
            return {"mask": self.mask, "score": self.score, "bias": self.bias}
        spec = catalog.InputSpec(B=B, Tq=Tq, Tk=Tk, Hq=Hq, Hkv=Hkv, D=D)
        return _mechanism_options(self.mechanism, spec)


_MECHANISM_CACHE: dict[tuple[str, catalog.InputSpec], dict[str, Any]] = {}


def _mechanism_options(name: str, spec: catalog.InputSpec) -> dict[str, Any]:
    # Built once per mechanism and size so masks and biases keep their caches across layers.
    key = (name, spec)
    if key not in _MECHANISM_CACHE:
        if len(_MECHANISM_CACHE) > 64:
            _MECHANISM_CACHE.clear()
        _MECHANISM_CACHE[key] = catalog.get(name).build(spec)
    return _MECHANISM_CACHE[key]


REGISTERED: dict[str, Implementation] = {}


def register(
    name: str = "attnkit",
    *,
    mask: Mask | None = None,
    score: ScoreFunction | None = None,
    bias: Bias | None = None,
    mechanism: str | None = None,
    backend: str = "auto",
) -> str:
    """Register an attention implementation called ``name`` with transformers; returns ``name``.

    With no options it is exact attention (the model's own causal/bidirectional/sliding mask
    and padding). ``mask`` is ANDed with the model's mask (e.g. ``masks.sinks(4) |
    masks.sliding_window(255)`` for StreamingLLM), ``score`` and ``bias`` replace softmax and
    add a positional bias. ``mechanism`` names a catalog entry instead (``attnkit list``).
    Use it with ``model.set_attn_implementation(name)`` or
    ``from_pretrained(..., attn_implementation=name)``.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    if mechanism is not None:
        if mask is not None or score is not None or bias is not None:
            raise ValueError("give either mechanism= or mask=/score=/bias=, not both")
        catalog.get(mechanism)  # fail now, with the list of names, not inside a forward
    REGISTERED[name] = Implementation(mask, score, bias, mechanism, backend)
    AttentionInterface.register(name, _attention_forward)
    AttentionMaskInterface.register(name, model_mask)
    return name


# -- the mask function -----------------------------------------------------------------------


def model_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> Mask:
    """transformers' mask description -> the exact ``attnkit`` mask (``AttentionMaskInterface``
    signature). ``attention_mask`` is the 2-D padding mask ``[B, past + q_length]``."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    evaluated = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=causal_mask_function if mask_function is None else mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        device=device,
    )
    evaluated = evaluated.expand(batch_size, 1, q_length, kv_length)
    keep = None
    if attention_mask is not None:
        keep = attention_mask[:, kv_offset : kv_offset + kv_length].bool().to(device)
    aligned = q_offset - kv_offset == kv_length - q_length  # attnkit aligns bottom-right
    for candidate in _candidates(aligned, local_size, keep, kv_length):
        if torch.equal(
            candidate.dense(q_length, kv_length, device).expand_as(evaluated), evaluated
        ):
            return candidate
    return masks.from_dense(evaluated.contiguous())


def _candidates(
    aligned: bool, local_size: int | None, keep: Tensor | None, kv_length: int
) -> Iterator[Mask]:
    patterns: list[Mask] = [masks.full()]
    if aligned:
        patterns.insert(0, masks.causal())
        if local_size is not None:
            patterns.insert(0, masks.sliding_window(local_size - 1))
    for pattern in patterns:
        if keep is None or bool(keep.all()):
            yield pattern
        else:
            yield pattern & masks.keys(keep)


# -- the attention function ------------------------------------------------------------------


def _attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Mask | Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``AttentionInterface`` signature: ``query [B, Hq, Tq, D]``, ``key``/``value``
    ``[B, Hkv, Tk, D]`` -> ``([B, Tq, Hq, Dv], None)``."""
    name = module.config._attn_implementation
    implementation = REGISTERED[name]
    if dropout:
        raise ValueError(
            f"attention dropout {dropout} is not supported by {name!r}; "
            "set the model's attention_dropout to 0 or call model.eval()"
        )
    for keyword, reason in UNSUPPORTED.items():
        if kwargs.get(keyword) is not None:
            raise ValueError(f"{name!r}: {reason} (got {keyword}=...)")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    B, Tq, Hq, D = q.shape
    options = dict(implementation.options(B, Tq, k.shape[1], Hq, k.shape[2], D))
    mask = _as_mask(attention_mask, is_causal, Tq)
    if options.get("mask") is not None:
        mask = options["mask"] if mask is None else mask & options["mask"]
    options["mask"] = mask
    if kwargs.get("softcap") is not None:
        score = options.get("score") or scores.softmax()
        if score.softcap is not None and score.softcap != kwargs["softcap"]:
            raise ValueError(f"{name!r} has softcap {score.softcap}, the model {kwargs['softcap']}")
        options["score"] = dataclasses.replace(score, softcap=kwargs["softcap"])
    recorder = _RECORDER.get()
    if recorder is None:
        out = attention(q, k, v, scale=scaling, backend=implementation.backend, **options)
        return out, None
    out, aux = attention(
        q, k, v, scale=scaling, backend=implementation.backend, aux=recorder.aux, **options
    )
    recorder.add(getattr(module, "layer_idx", None), aux)
    return out, None


def _as_mask(attention_mask: Mask | Tensor | None, is_causal: bool | None, Tq: int) -> Mask | None:
    if isinstance(attention_mask, Mask):
        return attention_mask
    if attention_mask is None:
        return masks.causal() if is_causal and Tq > 1 else None
    if attention_mask.dtype == torch.bool:
        return masks.from_dense(attention_mask)
    raise TypeError(
        f"got a {attention_mask.dtype} attention mask tensor; attnkit implementations take the "
        "mask their registered mask function builds (use hf.register, which installs both) or "
        "a bool mask [B, 1, Tq, Tk]"
    )


# -- capturing statistics --------------------------------------------------------------------


@dataclass
class AttentionRecord:
    """Aux outputs per layer, in call order: ``stats[layer_idx]`` is a list with one
    ``AuxOutput`` per forward of that layer (one per generated token in ``generate``)."""

    aux: Aux
    stats: dict[int | None, list[AuxOutput]] = field(default_factory=lambda: defaultdict(list))

    def add(self, layer: int | None, aux: AuxOutput) -> None:
        self.stats[layer].append(aux)


_RECORDER: contextvars.ContextVar[AttentionRecord | None] = contextvars.ContextVar(
    "attnkit_hf_recorder", default=None
)


@contextlib.contextmanager
def capture(
    *, lse: bool = False, weights: bool = False, key_sums: slice | Tensor | None = None
) -> Iterator[AttentionRecord]:
    """Record attention statistics of every attnkit-implemented layer run inside the block.

    The fields are those of ``attnkit.Aux``: ``lse`` ``[B, Tq, Hq]``, ``weights``
    ``[B, Hq, Tq, Tk]`` (small inputs only), ``key_sums`` ``[B, Hq, Tk]`` (per-key sums of
    attention weights over the chosen queries, without materialising ``Tq × Tk``).
    """
    aux = Aux(lse=lse, weights=weights, key_sums=key_sums)
    if not aux.needs_lse:
        raise ValueError("capture() needs at least one of lse=True, weights=True or key_sums=")
    record = AttentionRecord(aux)
    token = _RECORDER.set(record)
    try:
        yield record
    finally:
        _RECORDER.reset(token)


# -- replacing a model's attention layers ----------------------------------------------------


@dataclass
class _HFCache:
    """A transformers ``Cache`` seen through ``attnkit.nn.Cache`` (``[B, T, H, D]`` layout)."""

    cache: Any

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), layer)
        return k.transpose(1, 2), v.transpose(1, 2)

    def seen(self, layer: int) -> int:
        return self.cache.get_seq_length(layer)


class HFAttention(nn.Module):
    """A transformers self-attention module backed by an ``attnkit.nn.Attention`` layer.

    It takes the keyword arguments transformers' decoder layers pass (``hidden_states``,
    ``attention_mask``, ``position_ids``, and the cache as ``cache`` (transformers 5.25) or
    ``past_key_values`` (older releases)) and returns ``(out, None)``.
    The model's mask (an attnkit mask when the model's implementation is registered with
    ``register``) is ANDed with the layer's mechanism; keys and values go into the model's
    cache, so ``generate`` works unchanged.
    """

    def __init__(self, attention: nn.Module, layer_idx: int):
        super().__init__()
        self.attention = attention
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Mask | Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        T = hidden_states.shape[1]
        if position_ids is not None and position_ids.shape[0] == 1:
            position_ids = position_ids[0]
        # Without the cache, generate() would attend each new token to itself only.
        model_cache = cache if cache is not None else past_key_values
        cache = None if model_cache is None else _HFCache(model_cache)
        out = self.attention(
            hidden_states,
            positions=position_ids,
            cache=cache,
            layer=self.layer_idx,
            mask=_as_mask(attention_mask, True, T),
        )
        return out, None


def from_llama_attention(module: nn.Module, config: Any) -> nn.Module:
    """An ``attnkit.nn.Attention`` (GQA layout, the model's RoPE) with the weights of a
    Llama-style transformers attention module (``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``). Its mechanism is plain softmax: the model's mask arrives per call."""

    missing = [
        name for name in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(module, name)
    ]
    if missing:
        raise TypeError(
            f"{type(module).__name__} has no {', '.join(missing)}: only Llama-style attention "
            "modules (separate q/k/v/o projections, RoPE) can be converted"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer = Attention(
        AttentionConfig(
            d_model=config.hidden_size,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            layout="gqa",
            mechanism=Attend(scale=getattr(module, "scaling", None)),
            positional=Positional(rotary=Rotary.from_hf_config(config)),
            bias=module.q_proj.bias is not None,
        )
    )
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.heads, name).load_state_dict(getattr(module, name).state_dict())
        layer.o_proj.load_state_dict(module.o_proj.state_dict())
    return layer.to(module.q_proj.weight.dtype)


def swap_attention(model: nn.Module, convert: Any = None) -> nn.Module:
    """Replace every decoder layer's ``self_attn`` of a Llama-style model by an attnkit layer
    (``from_llama_attention``), optionally transformed by ``convert(layer) -> layer`` (e.g. a
    GQA→MLA conversion). Returns the model, changed in place."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no model.layers: not a decoder-only model")
    for index, block in enumerate(layers):
        layer = from_llama_attention(block.self_attn, model.config)
        if convert is not None:
            layer = convert(layer)
        block.self_attn = HFAttention(layer, index)
    return model


def perplexity(model: nn.Module, input_ids: Tensor, implementation: str | None = None) -> float:
    """Perplexity of a causal LM on ``input_ids [B, T]`` (teacher forcing, one forward):
    ``exp(mean next-token cross-entropy)``. With ``implementation``, the model's attention
    implementation is switched to it first (and left so)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got {tuple(input_ids.shape)}")
    if implementation is not None:
        model.set_attn_implementation(implementation)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())
    return float(torch.exp(loss))
