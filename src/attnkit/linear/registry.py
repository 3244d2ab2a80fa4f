"""``MECHANISMS``: the linear/recurrent family as data, for the catalog, benchmarks and layers.

Each entry names the public function, its forms (``reference``, ``chunked`` and, for causal
mechanisms, ``recurrent``), its paper, and ``extras(q, k, v)``: deterministic extra inputs
(gates, latent queries, feature projections) of the right shapes, so that any mechanism runs on
plain ``q, k, v`` — ``MECHANISMS[name].run(q, k, v)``. State-based mechanisms also give the
``LinearProblem`` they reduce to, which ``chunk_states`` uses.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.linear import additive, agent, decay, learned
from attnkit.linear.aaren import PAPER as AAREN_PAPER
from attnkit.linear.aaren import aaren
from attnkit.linear.based import PAPER as BASED_PAPER
from attnkit.linear.based import BasedState, based, based_problem
from attnkit.linear.chunked import LinearProblem, problem_chunk_states, recurrent_kernel_runs
from attnkit.linear.flare import PAPER as FLARE_PAPER
from attnkit.linear.flare import flare
from attnkit.linear.gla import PAPER as GLA_PAPER
from attnkit.linear.gla import gla, gla_problem
from attnkit.linear.learned import BASED_FEATURE_DIM, FLARE_LATENTS
from attnkit.linear.linear_attention import PAPER as LINEAR_PAPER
from attnkit.linear.linear_attention import linear_attention, linear_attention_problem
from attnkit.linear.prefix import PrefixState
from attnkit.linear.rat import PAPER as RAT_PAPER
from attnkit.linear.rat import RATState, rat
from attnkit.linear.state import ChunkStates, LinearState
from attnkit.opaque import call as opaque_call
from attnkit.opaque import opaque

Extras = Callable[[Tensor, Tensor, Tensor], dict[str, Any]]

#: Keyword inputs of the mechanisms' functions that choose how to run, not what to compute.
_RUN_OPTIONS = frozenset({"chunk_size", "initial_state", "return_state"})


_DRAWS: dict[tuple[tuple[int, ...], int], Tensor] = {}


@torch.compiler.assume_constant_result
def _standard_normal(shape: tuple[int, ...], seed: int) -> Tensor:
    """Seeded float64 draws, drawn once per shape and seed; inside ``torch.compile`` a constant
    of the graph (a generator cannot be created in one)."""
    key = (shape, seed)
    if key not in _DRAWS:
        if len(_DRAWS) >= 16:
            _DRAWS.clear()
        g = torch.Generator().manual_seed(seed)
        _DRAWS[key] = torch.randn(*shape, generator=g, dtype=torch.float64)
    return _DRAWS[key]


def _draw(like: Tensor, *shape: int, seed: int) -> Tensor:
    # operator.index keeps a compiled graph's sizes constants (the draws are per shape).
    drawn = _standard_normal(tuple(operator.index(n) for n in shape), seed)
    return drawn.to(device=like.device, dtype=like.dtype, copy=True)


def _no_extras(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
    return {}


def _gla_gate(k: Tensor, seed: int) -> Tensor:
    # GLA's gate: logsigmoid(x) / 16 (the paper's normaliser keeps gates near 1).
    return F.logsigmoid(_draw(k, *k.shape, seed=seed)) / 16


def _gla_extras(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
    return {"log_gate": _gla_gate(k, 1)}


def _vig_extras(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
    return {"log_gate": _gla_gate(k, 1), "backward_log_gate": _gla_gate(k, 2), "causal": False}


def _based_extras(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
    # A slice of q/k stands in for BASED's learned projection to 16 features.
    df = min(BASED_FEATURE_DIM, q.shape[-1])
    return {"feature_q": q[..., :df], "feature_k": k[..., :df], "window": 64}


def _aaren_extras(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
    # Aaren's query is one learned token; the first query stands in for it.
    return {"q": q[:, :1]}


def _rat_extras(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
    extras: dict[str, Any] = {"gate": torch.sigmoid(_draw(k, *k.shape, seed=3) + 1.0)}
    if v.shape[-1] != k.shape[-1]:
        extras["value_gate"] = torch.sigmoid(_draw(v, *v.shape, seed=4) + 1.0)
    return extras


def _flare_extras(causal: bool) -> Extras:
    def extras(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
        latents = _draw(k, 1, FLARE_LATENTS, k.shape[2], k.shape[3], seed=5)
        return {"q": latents / k.shape[-1] ** 0.25, "causal": causal}

    return extras


def _additive_extras(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
    return {"w": _draw(q, q.shape[2], q.shape[3], seed=6)}


def _efficient_additive(
    q: Tensor, k: Tensor, v: Tensor, *, w: Tensor, pooling: str = "l2", form: str = "chunked"
) -> Tensor:
    """SwiftFormer on the ``(q, k, v)`` signature: ``v`` is not used (SwiftFormer has no values;
    the output has ``q``'s shape)."""
    return additive.efficient_additive_attention(q, k, w, pooling=pooling, form=form)


def _based_problem(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_q: Tensor,
    feature_k: Tensor,
    eps: float = 1e-6,
    **window_options: Any,
) -> LinearProblem:
    """The linear half of BASED (the window half carries keys, not a linear state)."""
    return based_problem(feature_q, feature_k, v, eps=eps)


@dataclass(frozen=True)
class LinearMechanism:
    """One mechanism of the family.

    Attributes:
        name: registry key.
        paper: title, authors, year.
        summary: one line.
        fn: the public function ``fn(q, k, v, **options, form=...)``.
        forms: the forms it has.
        extras: ``extras(q, k, v) -> dict`` of deterministic extra inputs (a ``"q"`` key
            replaces ``q``, e.g. Aaren's single query or FLARE's latents).
        problem: for state-based mechanisms, ``problem(q, k, v, **options) -> LinearProblem``.
        causal: queries see only earlier tokens, so the recurrent form decodes token by token
            (False: the mechanism sees the whole sequence; a recurrent form, if any, is a scan
            over all of it).
        state: the state type carried between calls (None: no state in or out).
        options: fixed keyword options of ``fn`` that define this entry.
        gqa: query heads may share key/value heads (False: FLARE, whose keys query its
            latents and so need one key head per query head).
        learned: ``factory(n_heads, n_kv_heads, head_dim) -> module(q, k) -> extras``: what a
            layer learns in place of ``extras`` (``attnkit.linear.learned``); None: nothing.
        own_queries: its queries are its own (a learned query, agents, latents), so it takes
            any number of queries, also a different one from the keys'.
    """

    name: str
    paper: str
    summary: str
    fn: Callable[..., Any]
    forms: tuple[str, ...] = ("reference", "chunked", "recurrent")
    extras: Extras = _no_extras
    problem: Callable[..., LinearProblem] | None = None
    causal: bool = True
    state: type | None = None
    options: dict[str, Any] = field(default_factory=dict)
    gqa: bool = True
    learned: Callable[[int, int, int], nn.Module] | None = None
    own_queries: bool = False

    def form(self, name: str) -> Callable[..., Any]:
        """``fn`` with ``form=name`` fixed."""
        if name not in self.forms:
            raise ValueError(f"{self.name} has no {name!r} form; it has: {', '.join(self.forms)}")
        return functools.partial(self.fn, form=name)

    @property
    def reference(self) -> Callable[..., Any]:
        return self.form("reference")

    @property
    def chunked(self) -> Callable[..., Any]:
        return self.form("chunked")

    @property
    def recurrent(self) -> Callable[..., Any] | None:
        return self.form("recurrent") if "recurrent" in self.forms else None

    def inputs(self, q: Tensor, k: Tensor, v: Tensor, **options: Any) -> dict[str, Any]:
        """All keyword inputs of ``fn`` for plain ``q, k, v``: ``q, k, v``, the extras, the
        entry's fixed options, then ``options``."""
        extras = self.extras(q, k, v)
        return {"q": q, "k": k, "v": v} | extras | self.options | options

    def fastest_form(self, inputs: dict[str, Any]) -> str:
        """The form to run ``fn(**inputs)`` in for speed: ``recurrent`` where the compiled
        recurrent kernel runs it, else ``chunked``.

        The recurrent kernel takes 4·Dk·Dv flops per token, half the chunked form's, with the
        state kept in cache, so on a CPU it wins at every length (``attnkit bench linear``
        prints both). It runs where the recurrent form is the problem's recurrence alone (the
        state is a plain ``LinearState``), on CPU float32/bfloat16 without gradients, with at
        most ``recurrent_kernel_max_groups()`` query heads per key/value head (any Dv);
        elsewhere (training, GPUs) the chunked form is the fast one.
        """
        if self.problem is None or self.state is not LinearState:
            return "chunked"
        problem = self.problem(**{key: x for key, x in inputs.items() if key not in _RUN_OPTIONS})
        return "recurrent" if recurrent_kernel_runs(problem) else "chunked"

    def run(self, q: Tensor, k: Tensor, v: Tensor, *, form: str = "chunked", **options: Any):
        """Run on plain ``q [B, T, Hq, D]``, ``k``, ``v`` with the example extras; ``form`` is
        one of ``forms`` or ``"auto"`` (``fastest_form``)."""
        inputs = self.inputs(q, k, v, **options)
        if "initial_state" in inputs or inputs.get("return_state"):
            return self.form(self.fastest_form(inputs) if form == "auto" else form)(**inputs)
        (out,) = opaque_call(run_form, self.name, form, inputs)
        return out


def _run_form_fake(name: str, form: str, inputs: dict[str, Any]) -> list[Tensor]:
    q, v = inputs["q"], inputs["v"]  # q may be the mechanism's own learned queries
    return [v.new_empty(*v.shape[:2], q.shape[2], v.shape[3])]


@opaque(_run_form_fake)
def run_form(name: str, form: str, inputs: dict[str, Any]) -> list[Tensor]:
    """``[out [B, T, Hq, Dv]]``: mechanism ``name`` on its keyword ``inputs`` (no states in or
    out) in ``form``, ``"auto"`` for ``fastest_form``. Inside a compiled graph this runs as one
    op (``attnkit.opaque``): the form is chosen and the compiled kernels run at run time."""
    mechanism = get(name)
    if form == "auto":
        form = mechanism.fastest_form(inputs)
    return [mechanism.form(form)(**inputs)]


MECHANISMS: dict[str, LinearMechanism] = {
    m.name: m
    for m in (
        LinearMechanism(
            "linear_attention",
            LINEAR_PAPER,
            "causal linear attention, phi = elu + 1, normalised: an RNN with a D x Dv state",
            linear_attention,
            problem=linear_attention_problem,
            state=LinearState,
        ),
        LinearMechanism(
            "linear_attention_noncausal",
            LINEAR_PAPER,
            "non-causal linear attention phi(Q) (phi(K)^T V), phi = elu + 1, normalised",
            linear_attention,
            options={"causal": False},
            causal=False,
            state=LinearState,
        ),
        LinearMechanism(
            "lightning_attention",
            decay.LIGHTNING_PAPER,
            "causal linear attention with per-head decay exp(-alibi slope), block-wise "
            "(masked left product inside, decayed state across)",
            decay.lightning_attention,
            problem=decay.lightning_problem,
            state=LinearState,
        ),
        LinearMechanism(
            "retention",
            decay.RETNET_PAPER,
            "RetNet retention: (Q K^T * gamma^(n-m)) V, gamma_h = 1 - 2^(-5-h), chunkwise",
            decay.retention,
            problem=decay.retention_problem,
            state=LinearState,
        ),
        LinearMechanism(
            "gla",
            GLA_PAPER,
            "gated linear attention: data-dependent per-key-dim gates, chunkwise with "
            "secondary chunking (float32-safe)",
            gla,
            extras=_gla_extras,
            problem=gla_problem,
            state=LinearState,
            learned=learned.gla_gate,
        ),
        LinearMechanism(
            "gla_bidirectional",
            GLA_PAPER,
            "ViG's bidirectional GLA: forward + backward gated scans, summed",
            gla,
            extras=_vig_extras,
            causal=False,
            learned=learned.vig_gates,
        ),
        LinearMechanism(
            "based",
            BASED_PAPER,
            "2nd-order Taylor linear attention on 16 projected dims + 64-key sliding-window "
            "softmax attention, summed",
            based,
            extras=_based_extras,
            problem=_based_problem,
            state=BasedState,
            learned=learned.based_features,
        ),
        LinearMechanism(
            "aaren",
            AAREN_PAPER,
            "softmax attention of one learned query over every prefix: a parallel prefix "
            "scan of LSE merges, exact",
            aaren,
            extras=_aaren_extras,
            state=PrefixState,
            learned=learned.aaren_query,
            own_queries=True,
        ),
        LinearMechanism(
            "rat",
            RAT_PAPER,
            "gated recurrence inside 16-token chunks, softmax attention over chunk summaries "
            "(LSE-merged with the own chunk's running summary)",
            rat,
            extras=_rat_extras,
            state=RATState,
            learned=learned.rat_gate,
        ),
        LinearMechanism(
            "agent_attention",
            agent.PAPER,
            "16 agent tokens (pooled queries) gather from K, V and broadcast back to Q: "
            "O(N n d), non-causal",
            agent.agent_attention,
            forms=("reference", "chunked"),
            causal=False,
            own_queries=True,
        ),
        LinearMechanism(
            "flare",
            FLARE_PAPER,
            "16 latent queries per head gather from the tokens, the keys read them back: "
            "rank-16 attention in O(N M), non-causal",
            flare,
            forms=("reference", "chunked"),
            extras=_flare_extras(causal=False),
            causal=False,
            gqa=False,
            learned=learned.flare_latents(causal=False),
            own_queries=True,
        ),
        LinearMechanism(
            "flare_causal",
            FLARE_PAPER,
            "causal FLARE: each latent's prefix softmax (exact LSE scan), read by a softmax "
            "over the latents; O(M Dv) decoding state",
            flare,
            extras=_flare_extras(causal=True),
            state=PrefixState,
            gqa=False,
            learned=learned.flare_latents(causal=True),
            own_queries=True,
        ),
        LinearMechanism(
            "efficient_additive",
            additive.PAPER,
            "SwiftFormer: scored queries pooled into one global query, times each key; "
            "O(T D), non-causal, no values",
            _efficient_additive,
            forms=("reference", "chunked"),
            extras=_additive_extras,
            causal=False,
            learned=learned.additive_scores,
        ),
    )
}


def get(name: str) -> LinearMechanism:
    """The mechanism called ``name``; ``KeyError`` lists the known ones."""
    try:
        return MECHANISMS[name]
    except KeyError:
        raise KeyError(
            f"no linear mechanism named {name!r}; known: {', '.join(sorted(MECHANISMS))}"
        ) from None


def chunk_states(
    name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: LinearState | None = None,
    **options: Any,
) -> ChunkStates:
    """The state of a state-based mechanism at every chunk boundary (LASP-2 readiness).

    ``chunk_states("gla", q, k, v, log_gate=g)`` gives each chunk's own contribution
    (``update_kv``/``update_z``), its total decay (``log_decay``) and the state entering every
    chunk (``kv``/``z``); ``combine_states`` recomputes the latter from the former, which is
    what a context-parallel rank does after all-gathering its peers' contributions. Options are
    the mechanism's own (gates, feature maps); the entry's example extras fill the rest.
    """
    mechanism = get(name)
    if mechanism.problem is None:
        raise ValueError(
            f"{name} has no linear state to split into chunks; state-based mechanisms: "
            f"{', '.join(n for n, m in MECHANISMS.items() if m.problem is not None)}"
        )
    problem = mechanism.problem(**mechanism.inputs(q, k, v, **options))
    return problem_chunk_states(problem, chunk_size=chunk_size, initial_state=initial_state)
