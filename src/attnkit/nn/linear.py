"""``LinearAttend``: a mechanism of the linear/recurrent family as a layer's per-head attention.

``attnkit.nn.Attention(AttentionConfig(mechanism="gla", ...))`` runs the family's chunked form
for training, its fastest form for prefill (``LinearMechanism.fastest_form``) and its recurrent
form for decoding, carrying each layer's fixed-size state in the cache (``StateCache``) instead
of keys and values. The extra inputs some mechanisms need (gates, feature maps, learned
queries) are learned here by the module the mechanism's record names
(``LinearMechanism.learned``, ``attnkit.linear.learned``), from the per-head ``q``/``k`` the
layout hands over (the layout itself stays unchanged).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from attnkit import linear
from attnkit.opaque import call as opaque_call


class LinearAttend(nn.Module):
    """``attend(q, k, v)`` for a linear/recurrent mechanism; ``step(q, k, v, state)`` runs it
    with a carried state and returns ``(out, new_state)``.

    ``q [B, T, Hq, D]``, ``k``/``v`` ``[B, T, Hkv, D|Dv]`` -> ``[B, T, Hq, Dv]``. Several tokens
    (training, prefill; with ``step``, the state as the initial state) run in the mechanism's
    ``fastest_form``: the compiled recurrent kernel for CPU inference where it applies, else
    the chunked form. ``step`` runs one token in the recurrent form.
    """

    def __init__(self, name: str, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.mechanism = linear.get(name)
        factory = self.mechanism.learned
        self.learned = None if factory is None else factory(n_heads, n_kv_heads, head_dim)
        if not self.mechanism.gqa and n_kv_heads != n_heads:
            raise ValueError(
                f"{name} needs one key head per query head (its keys query the latents); "
                f"got {n_heads} query and {n_kv_heads} KV heads: use layout 'mha'"
            )

    @property
    def decodes(self) -> bool:
        """True if the mechanism can carry a state token by token (causal)."""
        return self.mechanism.causal and self.mechanism.state is not None

    def _inputs(self, q: Tensor, k: Tensor, v: Tensor, **options: Any) -> dict[str, Any]:
        # The registry's seeded example extras are replaced by the learned ones, not drawn.
        learned = {} if self.learned is None else self.learned(q, k)
        return {"q": q, "k": k, "v": v} | self.mechanism.options | learned | options

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        (out,) = opaque_call(linear.run_form, self.mechanism.name, "auto", self._inputs(q, k, v))
        return out

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: Any) -> tuple[Tensor, Any]:
        if not self.decodes:
            raise ValueError(
                f"{self.mechanism.name} is not causal (it sees the whole sequence): it cannot "
                "decode with a cache; run it without one"
            )
        inputs = self._inputs(q, k, v, initial_state=state, return_state=True)
        one_token = q.shape[1] == 1 and state is not None
        form = "recurrent" if one_token else self.mechanism.fastest_form(inputs)
        return self.mechanism.form(form)(**inputs)

    def extra_repr(self) -> str:
        return self.mechanism.name
