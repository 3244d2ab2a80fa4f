"""Finding retrieval heads: echo and induction scores on a repeated random sequence.

RazorAttention ("RazorAttention: Efficient KV Cache Compression Through Retrieval Heads", Tang
et al., 2024) keeps the full cache only for heads that retrieve from anywhere in the context,
found without training: feed the model a random token sequence repeated twice and, for every
query in the second copy, measure the attention on

- the previous occurrence of the query's own token (*echo* heads), and
- the token that followed that occurrence (*induction* heads: they copy what came next).

Heads with the highest scores are retrieval heads (the paper protects the top 14% induction
heads and the top 1% echo heads); the others keep only sinks and a recent window. These flags
drive ``attnkit.kv.DuoAttention`` (DuoAttention, Xiao et al., 2024, learns the same split with
gates; this is the training-free way to find it).

The scores need the attention weights of one short probe (``2 * length`` tokens), read with
``attnkit.Aux(weights=True)`` on attnkit-implemented layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from attnkit.api import attention
from attnkit.attend import Attend
from attnkit.call import Aux
from attnkit.integrations import hf
from attnkit.nn import Attention, TinyLM


@dataclass(frozen=True)
class HeadScores:
    """Per (layer, query head) scores, ``[num_layers, Hq]`` float32: mean attention weight on
    the previous occurrence (``echo``) and on its successor (``induction``)."""

    echo: Tensor
    induction: Tensor


def repeated_random_tokens(
    length: int, low: int, high: int, batch: int = 1, seed: int = 0
) -> Tensor:
    """``[batch, 2 * length]`` token ids: ``length`` distinct random ids in ``[low, high)``,
    then the same ids again."""
    if high - low < length:
        raise ValueError(f"need {length} distinct ids but the range [{low}, {high}) is smaller")
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(high - low, generator=generator)[:length] + low for _ in range(batch)]
    first = torch.stack(rows)
    return torch.cat([first, first], dim=1)


def scores_from_weights(weights: list[Tensor], length: int) -> HeadScores:
    """Echo and induction scores from per-layer weights ``[B, Hq, T, T]`` of a probe whose last
    ``2 * length`` tokens are a random sequence repeated twice (anything before them, e.g. a BOS
    token, is a fixed offset)."""
    if not weights:
        raise ValueError("no attention weights were recorded: is the model attnkit-implemented?")
    T = weights[0].shape[-1]
    if 2 * length > T:
        raise ValueError(f"weights cover {T} tokens, the probe needs 2 * length = {2 * length}")
    start = T - 2 * length
    queries = torch.arange(start + length, T)
    earlier = queries - length
    echo = torch.stack([w[:, :, queries, earlier].float().mean(dim=(0, 2)) for w in weights])
    induction = torch.stack(
        [w[:, :, queries, earlier + 1].float().mean(dim=(0, 2)) for w in weights]
    )
    return HeadScores(echo=echo, induction=induction)


@dataclass(frozen=True)
class _Recording(Attend):
    """An ``Attend`` that also records its attention weights (probe-sized inputs only)."""

    sink: list = field(default_factory=list, compare=False)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, aux = attention(
            q,
            k,
            v,
            mask=self.mask,
            score=self.score,
            bias=self.bias,
            scale=self.scale,
            backend=self.backend,
            aux=Aux(weights=True),
        )
        self.sink.append(aux.weights)
        return out


@contextlib.contextmanager
def _recording_nn(model: nn.Module) -> Iterator[list[Tensor]]:
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    sink: list[Tensor] = []
    saved = [m.attend for m in layers]
    for module, attend in zip(layers, saved, strict=True):
        options = {f.name: getattr(attend, f.name) for f in fields(Attend)}
        module.attend = _Recording(**options, sink=sink)
    try:
        yield sink
    finally:
        for module, attend in zip(layers, saved, strict=True):
            module.attend = attend


def head_scores(
    model: nn.Module, length: int = 64, low: int = 100, high: int | None = None, seed: int = 0
) -> HeadScores:
    """Echo and induction scores of every (layer, query head) of ``model`` on a repeated random
    sequence of ``2 * length`` tokens with ids in ``[low, high)`` (``high``: the vocabulary
    size by default; ``low`` skips special tokens).

    ``model`` is a transformers causal LM (its attention is switched to attnkit's exact
    implementation for the probe and restored) or an ``attnkit.nn`` model taking ``ids``.
    """

    if isinstance(model, TinyLM):
        high = model.config.vocab_size if high is None else high
        ids = repeated_random_tokens(length, low, high, seed=seed)
        with _recording_nn(model) as weights, torch.no_grad():
            model(ids)
        return scores_from_weights(list(weights), length)
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"head_scores takes a transformers causal LM or an attnkit.nn.TinyLM, got "
            f"{type(model).__name__}"
        )

    high = model.config.vocab_size if high is None else high
    ids = repeated_random_tokens(length, low, high, seed=seed)
    previous = model.config._attn_implementation
    model.set_attn_implementation(hf.register("attnkit-probe"))
    try:
        with hf.capture(weights=True) as record, torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    weights = [record.stats[layer][0].weights for layer in sorted(record.stats)]
    return scores_from_weights(weights, length)


def top_heads(scores: Tensor, fraction: float, groups: int = 1) -> Tensor:
    """Bool ``[num_layers, Hkv]``: the top ``fraction`` of KV heads by score (at least one).

    ``scores`` is ``[num_layers, Hq]``; a KV head scores the maximum of its ``groups`` query
    heads (it must keep everything if any head reading it retrieves)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    L, Hq = scores.shape
    if Hq % groups:
        raise ValueError(f"scores have {Hq} query heads, not a multiple of groups={groups}")
    per_kv = scores.view(L, Hq // groups, groups).amax(-1)
    flags = torch.zeros(per_kv.numel(), dtype=torch.bool)
    count = round(fraction * per_kv.numel())
    if fraction > 0:
        flags[per_kv.flatten().topk(max(1, count)).indices] = True
    return flags.view_as(per_kv)


def razor_retrieval_heads(
    scores: HeadScores, induction: float = 0.14, echo: float = 0.01, groups: int = 1
) -> Tensor:
    """RazorAttention's retrieval KV heads, bool ``[num_layers, Hkv]``: the top ``induction``
    fraction by induction score together with the top ``echo`` fraction by echo score."""
    return top_heads(scores.induction, induction, groups) | top_heads(scores.echo, echo, groups)
