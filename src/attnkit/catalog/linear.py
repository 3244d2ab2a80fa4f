"""Catalog entries for the linear and recurrent family: each runs its fastest form
(``run``: ``form="auto"``, the compiled recurrent kernel for CPU inference where it applies,
else the chunked form) against its quadratic reference (``reference``) on plain ``q, k, v``;
gates, latents and feature maps come seeded from the family's registry
(``attnkit.linear.MECHANISMS``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from attnkit import linear
from attnkit.mechanisms import InputSpec, Mechanism, register
from attnkit.primitives import expand_kv_heads


def _form(
    name: str, form: str
) -> Callable[[InputSpec], Callable[[Tensor, Tensor, Tensor], Tensor]]:
    def make(spec: InputSpec) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        mechanism = linear.get(name)

        def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if not mechanism.gqa and k.shape[2] != q.shape[2]:
                # FLARE's keys act as queries of the latents: one key head per query head
                groups = q.shape[2] // k.shape[2]
                k, v = expand_kv_heads(k, groups, dim=2), expand_kv_heads(v, groups, dim=2)
            return mechanism.run(q, k, v, form=form)

        return run

    return make


for _name, _mechanism in linear.MECHANISMS.items():
    register(
        Mechanism(
            _name,
            "linear",
            _mechanism.paper,
            _mechanism.summary,
            run=_form(_name, "auto"),
            reference=_form(_name, "reference"),
            cross=_mechanism.own_queries,
        )
    )
