"""Linear attention with feature maps — "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", Katharopoulos, Vyas, Pappas, Fleuret (2020).

Softmax's ``exp(q . k)`` is replaced by ``phi(q) . phi(k)``, so attention is computed right
product first, ``phi(Q) (phi(K)^T V)``, in ``O(T D^2)``:

    o_i = phi(q_i) S_i / (phi(q_i) . z_i),
    S_i = sum_(j<=i) phi(k_j)^T v_j,   z_i = sum_(j<=i) phi(k_j)

(non-causal: the sums run over all ``j``). With ``feature_map="identity"`` and
``normalize=False`` it is exactly the masked quadratic product ``((Q K^T) * M) V``, which the
tests check against a dense formula.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attnkit.linear._common import pick
from attnkit.linear.chunked import LinearProblem, solve
from attnkit.linear.state import LinearState

PAPER = (
    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention — "
    "Katharopoulos, Vyas, Pappas, Fleuret (2020)"
)


@dataclass(frozen=True)
class FeatureMap:
    """A feature map ``phi`` for queries and keys: its name in
    ``attnkit.linear.features.FEATURES`` (None: the identity), which the problem applies
    itself, and whether ``phi >= 0`` (which keeps the normaliser ``phi(q) . z`` positive)."""

    feature: str | None
    nonnegative: bool


#: Feature maps by name: the paper's ``elu(x) + 1``, ``relu`` and the identity.
FEATURE_MAPS: dict[str, FeatureMap] = {
    "elu": FeatureMap("elu", True),
    "relu": FeatureMap("relu", True),
    "identity": FeatureMap(None, False),
}


def linear_attention_problem(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: str = "elu",
    causal: bool = True,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float = 1.0,
) -> LinearProblem:
    """The shared recurrence (``attnkit.linear.chunked``) this call reduces to."""
    phi = pick(FEATURE_MAPS, feature_map, "feature_map")
    if normalize and not phi.nonnegative:
        raise ValueError(
            f"feature_map={feature_map!r} can make the normaliser phi(q).z zero or negative; "
            "use normalize=False or a non-negative map ('elu', 'relu')"
        )
    return LinearProblem(
        q, k, v, scale=scale, normalize=normalize, eps=eps, causal=causal,
        feature_map=phi.feature,
    )  # fmt: skip


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: str = "elu",
    causal: bool = True,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float = 1.0,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: LinearState | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, LinearState]:
    """Linear attention (Katharopoulos et al., 2020) of ``q [B, T, Hq, D]`` over
    ``k [B, T, Hkv, D]``, ``v [B, T, Hkv, Dv]`` (GQA: ``Hq % Hkv == 0``).

    Args:
        feature_map: ``"elu"`` (``elu(x) + 1``, the paper's), ``"relu"`` or ``"identity"``.
        causal: each query sees keys ``j <= i`` (the RNN); False: every key.
        normalize: divide by ``scale * phi(q_i) . z_i + eps`` (the paper's denominator).
        scale: multiplies ``phi(q) . phi(k)`` (1: the paper; cancels when normalised, up to eps).
        form: ``"chunked"`` (intra-chunk quadratic + inter-chunk state), ``"recurrent"`` (one
            token at a time: decoding) or ``"reference"`` (the dense quadratic form).
        chunk_size: tokens per chunk of the chunked form (any size; need not divide ``T``).
        initial_state: a ``LinearState`` (``kv [B, Hkv, D, Dv]``, ``z [B, Hkv, D]`` when
            normalised) continuing earlier tokens; it also adds to every non-causal query.
        return_state: also return the final ``LinearState``.

    Returns:
        ``out [B, T, Hq, Dv]`` in the input dtype (and the state).
    """
    problem = linear_attention_problem(
        q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, eps=eps, scale=scale
    )
    return solve(
        problem,
        form=form,
        chunk_size=chunk_size,
        initial_state=initial_state,
        return_state=return_state,
    )
