"""``attnkit.attention``: one function for every mechanism, and the dispatcher behind it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.aux import compute_aux
from attnkit.backends import BACKENDS, Backend
from attnkit.call import AttentionCall, Aux, AuxOutput
from attnkit.dispatch import auto_preferences
from attnkit.masks.base import Mask
from attnkit.merge import merge
from attnkit.opaque import call as opaque_call
from attnkit.opaque import opaque
from attnkit.positional import Bias
from attnkit.primitives import accumulation_dtype
from attnkit.scores import ScoreFunction, Softmax

_warned: set[str] = set()


@dataclass
class Explanation:
    """Which backend ``attention`` runs for a call, and why each other one was not chosen."""

    chosen: str
    why: str
    rejected: dict[str, str]

    def __str__(self) -> str:
        lines = [f"runs on: {self.chosen} — {self.why}"]
        lines += [f"  not {name}: {reason}" for name, reason in self.rejected.items()]
        return "\n".join(lines)


def _refusal(backend: Backend, call: AttentionCall) -> str | None:
    """Why ``backend`` cannot run ``call`` (each of its passes), or None."""
    for part in call.passes():
        reason = backend.supports(part)
        if reason and part is not call:
            return (
                f"{reason} (the signed score {call.score.describe()} runs as two "
                "positive-weight passes, each returning its log-sum-exp)"
            )
        if reason:
            return reason
    return None


def _run(backend: Backend, call: AttentionCall) -> tuple[Tensor, Tensor | None]:
    """Run ``call`` on ``backend``. A signed score (Cog) runs as its two positive-weight
    halves, merged with the negative half's sign flipped:
    ``out = (Z+ o+ - Z- o-) / (Z+ + Z-)``, ``lse = log(Z+ + Z-)`` (the LSE merge,
    ``attnkit.merge``, applied to ``o+`` and ``-o-``)."""
    if not call.score.signed:
        return backend.run(call)
    (pos, lse_pos), (neg, lse_neg) = (backend.run(part) for part in call.passes())
    acc = call.accumulation_dtype
    out, lse = merge(pos.to(acc), lse_pos, -neg.to(acc), lse_neg)
    return out.to(call.dtype), lse


def _select(call: AttentionCall, backend: str) -> tuple[Backend, Explanation]:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}")
    rejected = {name: reason for name, b in BACKENDS.items() if (reason := _refusal(b, call))}
    if backend != "auto":
        if backend in rejected:
            able = [n for n in BACKENDS if n not in rejected]
            raise ValueError(
                f"backend {backend!r} cannot run this call: {rejected[backend]}. "
                f"Backends that can: {', '.join(able)} (or backend='auto')"
            )
        others = {name: f"the caller forced {backend!r}" for name in BACKENDS if name != backend}
        return BACKENDS[backend], Explanation(backend, "requested by the caller", others | rejected)
    preferences = auto_preferences(call)
    for name, why, candidate in preferences:
        if candidate and name not in rejected:
            passed_over = {other: "not ranked by auto (select it by name)" for other in BACKENDS}
            passed_over.update(
                {o: f"ranked after {name}: {r}" if able else r for o, r, able in preferences}
            )
            passed_over.update(rejected)
            del passed_over[name]
            return BACKENDS[name], Explanation(name, why, passed_over)
    raise RuntimeError(f"no backend can run this call: {rejected}")


def _warn_slow_once(explanation: Explanation) -> None:
    if explanation.chosen != "reference" or explanation.why in _warned:
        return
    _warned.add(explanation.why)
    details = "; ".join(f"{n}: {r}" for n, r in explanation.rejected.items())
    warnings.warn(
        f"attnkit: backend='auto' runs this call on the slow dense reference ({details})",
        stacklevel=3,
    )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | None = None,
    score: ScoreFunction | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
    backend: str = "auto",
    aux: Aux | None = None,
) -> Tensor | tuple[Tensor, AuxOutput]:
    """Attention of ``q [B, Tq, Hq, D]`` over ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]``.

    out[b, i, h] = sum_j w(softcap(scale * q_i.k_j + bias(h, i, j))) * mask(b, h, i, j) * v_j / Z_i

    Args:
        q, k, v: ``[B, T, H, D]`` tensors of one float dtype and device. ``Hq`` must be a
            multiple of ``Hkv`` (GQA/MQA: k/v heads are shared, never expanded in memory by
            the fast backends); ``Dv`` may differ from ``D``; ``Tq`` may differ from ``Tk``.
        mask: an ``attnkit.masks`` pattern (``causal()``, ``sliding_window(255) | sinks(4)``, ...).
            Positions are bottom-right aligned: with ``Tq < Tk`` the last query sees the last key.
        score: an ``attnkit.scores`` function (softmax by default; sigmoid, softplus_l1, relu,
            softcap, cog). Signed scores (cog) run as two positive-weight passes on the chosen
            backend.
        bias: an additive ``attnkit.positional`` bias (ALiBi, learned relative bias).
        scale: score scale, ``1 / sqrt(D)`` by default.
        backend: ``"auto"`` or a name of ``attnkit.backends.BACKENDS`` (``reference``,
            ``sdpa``, ``flex``, ``chunked``, ``blocksparse``); a forced backend that cannot run
            the call raises and says which can.
        aux: ``attnkit.Aux(lse=..., weights=..., key_sums=...)`` for extra outputs.

    Returns:
        ``out [B, Tq, Hq, Dv]`` in the input dtype; with ``aux``, ``(out, AuxOutput)``.
        A query that sees no key gets a zero output (never NaN).

    Inside ``torch.compile`` and ``torch.export`` the call is one custom op
    (``torch.ops.attnkit.eager``, ``attnkit.opaque``) whose inputs are ``q``, ``k``, ``v`` and
    the tensors the mask, bias and ``aux`` carry: ``fullgraph=True`` traces through it, forward
    and backward, and it runs exactly as here.
    """
    options = dict(mask=mask, score=score, bias=bias, scale=scale, backend=backend, aux=aux)
    if torch.compiler.is_compiling():
        return _traced_attention(q, k, v, options)
    return _attention(q, k, v, **options)


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | None,
    score: ScoreFunction | None,
    bias: Bias | None,
    scale: float | None,
    backend: str,
    aux: Aux | None,
) -> Tensor | tuple[Tensor, AuxOutput]:
    call = AttentionCall(q, k, v, mask, score or Softmax(), bias, scale, aux or Aux())
    chosen, explanation = _select(call, backend)
    if backend == "auto":
        _warn_slow_once(explanation)
    out, lse = _run(chosen, call)
    out = call.finalize(out, lse)
    if aux is None:
        return out
    return out, compute_aux(call, lse)


# -- inside torch.compile and torch.export: one opaque op (attnkit.opaque) -------------------


def _aux_shapes(q: Tensor, k: Tensor, v: Tensor, aux: Aux | None) -> dict[str, tuple]:
    """Shape and dtype of each of ``_attention_outputs``'s outputs."""
    B, Tq, Hq, _ = q.shape
    Tk = k.shape[1]
    aux = aux or Aux()
    return {
        "out": ((B, Tq, Hq, v.shape[3]), q.dtype),
        "lse": ((B, Tq, Hq) if aux.lse else (0,), accumulation_dtype(q.dtype)),
        "weights": ((B, Hq, Tq, Tk) if aux.weights else (0,), q.dtype),
        "key_sums": ((B, Hq, Tk) if aux.key_sums is not None else (0,), torch.float32),
    }


def _attention_fake(q: Tensor, k: Tensor, v: Tensor, options: dict) -> list[Tensor]:
    # Validating here raises bad input's errors while tracing, not at the first run.
    score = options["score"] or Softmax()
    AttentionCall(q, k, v, options["mask"], score, options["bias"], options["scale"])
    shapes = _aux_shapes(q, k, v, options["aux"]).values()
    return [q.new_empty(shape, dtype=dtype) for shape, dtype in shapes]


@opaque(_attention_fake)
def _attention_outputs(q: Tensor, k: Tensor, v: Tensor, options: dict) -> list[Tensor]:
    """``_attention`` as four tensors: out, lse, weights, key_sums (empty where not asked)."""
    aux = options["aux"]
    result = _attention(q, k, v, **options)
    out, extra = (result, AuxOutput()) if aux is None else result
    outputs = []
    for name, (shape, dtype) in _aux_shapes(q, k, v, aux).items():
        value = out if name == "out" else getattr(extra, name)
        outputs.append(q.new_empty(shape, dtype=dtype) if value is None else value.to(dtype))
    return outputs


def _traced_attention(
    q: Tensor, k: Tensor, v: Tensor, options: dict
) -> Tensor | tuple[Tensor, AuxOutput]:
    out, lse, weights, key_sums = opaque_call(_attention_outputs, q, k, v, options)
    aux = options["aux"]
    if aux is None:
        return out
    return out, AuxOutput(
        lse=lse if aux.lse else None,
        weights=weights if aux.weights else None,
        key_sums=key_sums if aux.key_sums is not None else None,
    )


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | None = None,
    score: ScoreFunction | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
    backend: str = "auto",
    aux: Aux | None = None,
) -> Explanation:
    """Say which backend ``attention(...)`` with these arguments would run, and why every
    other backend was rejected or passed over. Takes the same arguments; computes nothing."""
    call = AttentionCall(q, k, v, mask, score or Softmax(), bias, scale, aux or Aux())
    return _select(call, backend)[1]
