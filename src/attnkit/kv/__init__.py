"""KV caches for decoding: eviction policies that free memory per head, prefix sharing and
split-KV decoding.

    from attnkit import kv
    cache = kv.KVCache(kv.SnapKV(budget=256, window=32))
    kv.use(model).generate(prompt, max_new_tokens=32, cache=cache)   # attnkit.nn models

    from attnkit.kv import hf                                        # transformers models
    hf.prepare(model)
    model.generate(**batch, past_key_values=hf.KVCacheHF(kv.SnapKV(0.2), model.config))

- ``KVCache`` (``attnkit.kv.cache``): per-(layer, batch row, KV head) variable-length storage;
  ``nbytes()`` is the bytes of the kept entries.
- policies (``attnkit.kv.policies``): ``FullCache``, ``StreamingLLM``, ``H2O``, ``SnapKV``,
  ``pyramid_kv`` (PyramidKV), ``DuoAttention``; budgets in ``attnkit.kv.budget``.
- ``attnkit.kv.retrieval_heads``: RazorAttention's echo/induction scores -> DuoAttention flags.
- ``attnkit.kv.prefix``: ChunkAttention's prefix-shared chunks and two-phase attention.
- ``attnkit.kv.decode``: split-KV (flash-decoding / LeanAttention) decoding.
- ``attnkit.kv.evaluate``: perplexity, passkey retrieval, bytes kept and decode time of a policy
  on a transformers model (needs ``transformers``, as does ``attnkit.kv.hf``).
"""

from attnkit.kv.budget import Budget, pyramid
from attnkit.kv.cache import KVAttend, KVCache, use
from attnkit.kv.policies import (
    H2O,
    POLICIES,
    DuoAttention,
    FullCache,
    Policy,
    SnapKV,
    StepView,
    StreamingLLM,
    pyramid_kv,
    select,
)

__all__ = [
    "H2O",
    "POLICIES",
    "Budget",
    "DuoAttention",
    "FullCache",
    "KVAttend",
    "KVCache",
    "Policy",
    "SnapKV",
    "StepView",
    "StreamingLLM",
    "pyramid",
    "pyramid_kv",
    "select",
    "use",
]
