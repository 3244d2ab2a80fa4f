"""``attnkit.kv`` caches in Hugging Face transformers' ``generate``.

    from attnkit import kv
    kv.hf.prepare(model)                                   # the "attnkit-kv" implementation
    cache = kv.hf.KVCacheHF(kv.SnapKV(budget=256), model.config)
    model.generate(**batch, past_key_values=cache, max_new_tokens=32)

``KVCacheHF`` is a transformers ``Cache`` whose layers store through one ``attnkit.kv.KVCache``.
transformers builds the attention mask from the cache's sizes, which cannot describe per-head
lengths, so the cache needs its own attention implementation (``prepare``): its mask function
only records what the model asked for (the mask function, the 2-D padding mask, the query
offset), and its attention function evaluates that at the *original positions* of the keys each
head kept — causal by position, padding by position — then lets the cache evict. Positions come
from tokens seen: ``get_seq_length`` is the number of tokens seen, not stored, so RoPE and
``position_ids`` continue correctly after eviction. Padding keys are never stored.

A ``KVCacheHF`` used with another attention implementation raises at the second layer of the
first forward (nothing would be masked or evicted). Beam search, cache cropping (assisted
decoding) and batch re-indexing are not supported and raise.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import causal_mask_function

from attnkit import scores
from attnkit.api import attention
from attnkit.integrations import hf as integration
from attnkit.kv.cache import KVCache, pending_step
from attnkit.kv.policies import Policy

#: The attention implementation name ``prepare`` registers.
NAME = "attnkit-kv"


@dataclass(frozen=True)
class MaskRequest:
    """What transformers asked the mask function for, kept for the attention function
    (``AttentionMaskInterface`` arguments; ``attention_mask`` is the 2-D padding mask)."""

    arguments: dict[str, Any]


_MODEL_MASK = inspect.signature(integration.model_mask)


def _mask_function(*args: Any, **kwargs: Any) -> MaskRequest:
    """``AttentionMaskInterface`` (the signature of ``integration.model_mask``): the request
    is kept for the attention function, which builds the mask from the cache's positions."""
    bound = _MODEL_MASK.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = {name: value for name, value in bound.arguments.items() if name != "kwargs"}
    arguments["q_offset"] = int(arguments["q_offset"])
    return MaskRequest(arguments)


def _attention_function(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: MaskRequest | Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``AttentionInterface`` signature: ``query [B, Hq, Tq, D]``, ``key``/``value``
    ``[B, Hkv, Tk, D]`` -> ``([B, Tq, Hq, Dv], None)``."""
    if dropout:
        raise ValueError(f"{NAME!r} does not support attention dropout; call model.eval()")
    for keyword, reason in integration.UNSUPPORTED.items():
        if kwargs.get(keyword) is not None:
            raise ValueError(f"{NAME!r}: {reason} (got {keyword}=...)")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    score = None if kwargs.get("softcap") is None else scores.softmax(kwargs["softcap"])
    step = pending_step(key)
    if step is None:  # no attnkit.kv cache: exact attention with the model's own mask
        if isinstance(attention_mask, MaskRequest):
            mask = integration.model_mask(**attention_mask.arguments)
        else:
            mask = integration._as_mask(attention_mask, is_causal, q.shape[1])
        return attention(q, k, v, mask=mask, score=score, scale=scaling), None
    if not isinstance(attention_mask, MaskRequest):
        step.cache.reset()
        raise ValueError(
            f"{NAME!r} with an attnkit.kv cache needs transformers to build the mask with its mask "
            f"function; got a {type(attention_mask).__name__} (pass a 2-D attention_mask, not a "
            "4-D one)"
        )
    request = attention_mask.arguments
    seen_before = step.cache.seen(step.layer) - step.new_tokens
    if request["q_offset"] != seen_before:
        step.cache.reset()
        raise ValueError(
            f"transformers placed the queries at position {request['q_offset']} but the cache has "
            f"seen {seen_before} tokens; pass the same KVCacheHF to every forward of a sequence"
        )
    positions = step.positions
    padding = request["attention_mask"]
    key_mask = None
    if padding is not None and not bool(padding.all()):
        key_mask = padding.to(positions.device).bool()[step.batch_index(), positions]
    query_key_mask = None
    function = request["mask_function"]
    if function is not None and function is not causal_mask_function:
        # any other model mask (sliding window, chunked, ...) evaluated at the kept positions
        Tq, N = q.shape[1], positions.numel()
        q_positions = torch.arange(Tq, device=positions.device).view(1, 1, -1, 1) + seen_before
        allowed = function(
            step.batch_index().view(1, 1, 1, -1),
            torch.zeros(1, 1, 1, 1, dtype=torch.long, device=positions.device),
            q_positions,
            positions.view(1, 1, 1, -1),
        )
        query_key_mask = allowed.expand(1, 1, Tq, N)[0, 0]
    out = step.cache.attend(
        q,
        k,
        causal=True,
        key_mask=key_mask,
        query_key_mask=query_key_mask,
        score=score,
        scale=scaling,
    )
    return out, None


def register() -> str:
    """Register the ``attnkit-kv`` attention implementation with transformers; returns its name.
    Without an attnkit.kv cache it is exact attention (``attnkit.integrations.hf``)."""
    AttentionInterface.register(NAME, _attention_function)
    AttentionMaskInterface.register(NAME, _mask_function)
    return NAME


def prepare(model: nn.Module) -> nn.Module:
    """Switch ``model`` to the ``attnkit-kv`` attention implementation (registering it), so
    ``generate(past_key_values=KVCacheHF(...))`` masks and evicts per head. Returns ``model``."""
    model.set_attn_implementation(register())
    return model


class KVLayer(CacheLayerMixin):
    """One layer of a ``KVCacheHF``: a view of the shared ``KVCache``."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, store: KVCache, index: int):
        super().__init__()
        self.store, self.index = store, index

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        self.is_initialized = True
        k, v = self.store.update(
            self.index, key_states.transpose(1, 2), value_states.transpose(1, 2)
        )
        return k.transpose(1, 2), v.transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # every token seen: the mask function receives the whole 2-D padding mask, and the
        # attention function evaluates it at the positions each head kept
        return self.store.seen(self.index) + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.seen(self.index)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store.reset()

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "attnkit.kv caches do not support beam search, cache cropping (assisted decoding) or "
            "batch re-indexing; generate with num_beams=1 and num_return_sequences=1"
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported


class KVCacheHF(Cache):
    """A transformers ``Cache`` storing through an ``attnkit.kv.KVCache`` with ``policy``.

    ``config`` is the model's (text) config: the policy is checked against its
    ``num_hidden_layers`` and ``num_key_value_heads`` now, so a mismatched per-layer budget or
    retrieval-head table fails before generation starts. The attnkit cache is ``self.store``
    (``nbytes()``, ``stored(layer)``, ``positions(layer)``).
    """

    def __init__(self, policy: Policy | None, config: Any):
        num_layers = config.num_hidden_layers
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.store = KVCache(policy, num_layers=num_layers, num_kv_heads=num_kv_heads)
        super().__init__(layers=[KVLayer(self.store, i) for i in range(num_layers)])
