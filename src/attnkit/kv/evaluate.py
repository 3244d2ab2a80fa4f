"""Measuring a KV policy on a transformers causal LM: perplexity, passkey retrieval, bytes kept
and decode time per token (what ``attnkit bench kv`` reports).

    from attnkit import kv
    from attnkit.kv import evaluate
    report = evaluate.evaluate(model, tokenizer, kv.SnapKV(budget=0.2), text)
    ids, answer = evaluate.passkey_prompt(tokenizer, n_tokens=1500, depth=0.5, key=71432)
    evaluate.passkey_correct(model, tokenizer, ids, answer, kv.SnapKV(budget=0.2))

Every function switches the model to the ``attnkit-kv`` implementation (``attnkit.kv.hf``) and
decodes through a fresh ``KVCacheHF`` per sequence; ``policy=None`` is the full cache.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.kv import hf
from attnkit.kv.policies import Policy

#: Haystack of the passkey test ("Landmark Attention: Random-Access Infinite Context Length
#: for Transformers", Mohtashami & Jaggi, 2023): repeated filler the key hides in.
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


@dataclass(frozen=True)
class KVReport:
    """One policy on one text: ``perplexity`` (decoding with the cache), ``kv_bytes`` kept at
    the end, ``full_bytes`` a full cache would hold, ``seconds_per_token`` of decoding."""

    perplexity: float
    kv_bytes: int
    full_bytes: int
    seconds_per_token: float

    @property
    def kept_fraction(self) -> float:
        return self.kv_bytes / self.full_bytes if self.full_bytes else 1.0


def _cache(model: Any, policy: Policy | None) -> Any:
    hf.prepare(model)
    return hf.KVCacheHF(policy, model.config)


def _check_ids(input_ids: Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [1, T] with T >= 2, got {tuple(input_ids.shape)}")


@torch.no_grad()
def perplexity(
    model: Any, input_ids: Tensor, policy: Policy | None = None, chunk_size: int = 1
) -> tuple[float, Any]:
    """Perplexity of ``input_ids [1, T]`` decoded through a policy's cache, ``chunk_size``
    tokens per forward (1 = token by token: each token is predicted from the cache as the policy
    left it; larger chunks also see their own chunk causally and are faster). Fractional budgets
    resolve against the first chunk, so give fractions only with a first chunk that is the
    prompt; for streaming perplexity give token budgets. Returns ``(perplexity, cache)``."""
    _check_ids(input_ids)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cache = _cache(model, policy)
    logits = []
    for start in range(0, input_ids.shape[1] - 1, chunk_size):
        chunk = input_ids[:, start : min(start + chunk_size, input_ids.shape[1] - 1)]
        out = model(input_ids=chunk, past_key_values=cache, use_cache=True)
        logits.append(out.logits.float())
    logits = torch.cat(logits, dim=1)
    loss = F.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())
    return float(torch.exp(loss)), cache


@torch.no_grad()
def decode_seconds_per_token(
    model: Any, input_ids: Tensor, policy: Policy | None = None, new_tokens: int = 16
) -> float:
    """Median wall time of one greedy decoding step after a prefill of ``input_ids [1, T]``
    with the policy's cache (the prefill is not timed)."""
    _check_ids(input_ids)
    cache = _cache(model, policy)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(
    model: Any,
    tokenizer: Any,
    policy: Policy | None,
    text: str,
    prompt_tokens: int | None = None,
    new_tokens: int = 16,
) -> KVReport:
    """Perplexity of ``text`` (the first ``prompt_tokens`` tokens, default half, are the prompt
    — a fractional budget is a fraction of it — the rest is decoded token by token), the KV
    bytes kept at the end against a full cache, and the decode time per token after the
    prompt."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    _check_ids(ids)
    prompt = ids.shape[1] // 2 if prompt_tokens is None else prompt_tokens
    if not 1 <= prompt < ids.shape[1]:
        raise ValueError(f"prompt_tokens must lie in [1, {ids.shape[1] - 1}], got {prompt}")
    with torch.no_grad():
        cache = _cache(model, policy)
        logits = [model(input_ids=ids[:, :prompt], past_key_values=cache).logits.float()]
        for t in range(prompt, ids.shape[1] - 1):
            logits.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits.float())
    logits = torch.cat(logits, dim=1)
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    seconds = decode_seconds_per_token(model, ids[:, :prompt], policy, new_tokens)
    return KVReport(
        float(torch.exp(loss)), cache.store.nbytes(), cache.store.full_nbytes(), seconds
    )


def passkey_prompt(
    tokenizer: Any, n_tokens: int, depth: float, key: int | str
) -> tuple[Tensor, str]:
    """A passkey-retrieval prompt of about ``n_tokens`` tokens (Mohtashami & Jaggi, 2023): filler
    text with "The pass key is KEY. Remember it." inserted at ``depth`` (0 = start, 1 = end of
    the filler), then "What is the pass key? The pass key is". Returns ``(input_ids [1, T],
    answer)``; score a continuation with ``answer in generated_text``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    answer = str(key)
    needle = f"The pass key is {answer}. Remember it. {answer} is the pass key. "
    question = "What is the pass key? The pass key is"
    fixed = len(tokenizer(needle + question).input_ids)
    per_filler = len(tokenizer(FILLER * 8).input_ids) / 8
    repeats = max(1, round((n_tokens - fixed) / per_filler))
    if n_tokens <= fixed:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for filler (needs > {fixed})")
    before = round(repeats * depth)
    text = FILLER * before + needle + FILLER * (repeats - before) + question
    return tokenizer(text, return_tensors="pt").input_ids, answer


@torch.no_grad()
def passkey_correct(
    model: Any, tokenizer: Any, input_ids: Tensor, answer: str, policy: Policy | None = None
) -> bool:
    """Greedy-generate the answer's length (plus two tokens) after ``input_ids`` with the
    policy's cache; True if ``answer`` appears in the generated text."""
    cache = _cache(model, policy)
    n_new = len(tokenizer(" " + answer).input_ids) + 2
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        past_key_values=cache,
        max_new_tokens=n_new,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return answer in tokenizer.decode(out[0, input_ids.shape[1] :])
