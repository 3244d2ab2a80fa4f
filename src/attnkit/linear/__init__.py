"""Linear and recurrent attention: mechanisms that replace the ``T x T`` softmax matrix with a
fixed-size state, a few latent/agent tokens, or a global pooled query.

    from attnkit import linear
    out = linear.gla(q, k, v, log_gate)                           # chunked (training, prefill)
    out, state = linear.gla(q, k, v, log_gate, return_state=True)
    step = linear.gla(q1, k1, v1, g1, form="recurrent", initial_state=state)   # decoding

One convention for every mechanism: tensors ``[B, T, H, D]`` (GQA: ``Hq % Hkv == 0`` where the
paper allows it), ``form="chunked" | "recurrent" | "reference"`` (the fast parallel form, the
RNN for decoding, and the quadratic form that reads like the paper — all exact rewritings of one
another), ``chunk_size`` (an execution detail except for RAT, where it is the model's chunk),
``initial_state=`` a state object of the mechanism and ``return_state=True`` for
``(out, final_state)``. States accumulate in float32 whatever the input dtype. Non-causal
mechanisms (agent attention, FLARE's encoder form, SwiftFormer, non-causal linear attention,
bidirectional GLA) have no decoding form.

Which form is fastest depends on the hardware: on a CPU without gradients the compiled
recurrent kernel beats the chunked form at every length (``attnkit bench linear``), on parallel
hardware and in training the chunked form wins. ``MECHANISMS[name].run(q, k, v, form="auto")``
and ``LinearMechanism.fastest_form`` choose (``attnkit.nn`` layers do so for prefill).

``MECHANISMS`` lists the family as data; ``chunk_states`` exposes the state at every chunk
boundary of the state-based mechanisms (for LASP-2-style context parallelism, together with
``combine_states``).
"""

from attnkit.linear.aaren import aaren
from attnkit.linear.additive import efficient_additive_attention
from attnkit.linear.agent import agent_attention, pool_agents
from attnkit.linear.based import BasedState, based
from attnkit.linear.chunked import LinearProblem, solve
from attnkit.linear.decay import lightning_attention, retention
from attnkit.linear.features import taylor_feature_map
from attnkit.linear.flare import flare
from attnkit.linear.gla import gla
from attnkit.linear.linear_attention import FEATURE_MAPS, linear_attention
from attnkit.linear.prefix import PrefixState, prefix_attention, prefix_scan
from attnkit.linear.rat import RATState, rat
from attnkit.linear.registry import MECHANISMS, LinearMechanism, chunk_states, get, run_form
from attnkit.linear.state import ChunkStates, LinearState, combine_states

__all__ = [
    "FEATURE_MAPS",
    "MECHANISMS",
    "BasedState",
    "ChunkStates",
    "LinearMechanism",
    "LinearProblem",
    "LinearState",
    "PrefixState",
    "RATState",
    "aaren",
    "agent_attention",
    "based",
    "chunk_states",
    "combine_states",
    "efficient_additive_attention",
    "flare",
    "get",
    "gla",
    "lightning_attention",
    "linear_attention",
    "pool_agents",
    "prefix_attention",
    "prefix_scan",
    "rat",
    "retention",
    "run_form",
    "solve",
    "taylor_feature_map",
]
