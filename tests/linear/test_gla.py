"""Gated linear attention (Yang et al., 2024) and ViG's bidirectional form."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from linear_helpers import check_forms, draw, qkv, split_run
from torch import Tensor

from attnkit.linear import LinearState, gla, linear_attention
from attnkit.linear.chunked import (
    _chunks,
    _intra_vector,
    _intra_vector_secondary,
    _subchunk,
)
from attnkit.testing import FLOORS, check_function


def gates(shape, dtype=torch.float32, strength=1.0, seed=3):
    return F.logsigmoid(draw(*shape, dtype=torch.float64, seed=seed) + 1.0).to(dtype) * strength


def inputs(dtype=torch.float32, T=45, per_dim=True, **sizes):
    x = qkv(T=T, dtype=dtype, **sizes)
    B, _, Hkv, Dk = x["k"].shape
    return x | {"log_gate": gates((B, T, Hkv, Dk if per_dim else 1), dtype)}


def gla_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gate: Tensor,
    kv0: Tensor | None = None,
    *,
    causal: bool = True,
    backward_log_gate: Tensor | None = None,
    scale: float | None = None,
    final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """GLA written from the paper, token by token (Yang et al., 2024, eq. 4): for query head
    ``h``, reading key/value head ``h // (Hq / Hkv)``,

        S_t = diag(alpha_t) S_(t-1) + k_t^T v_t,    o_t = scale * q_t S_t,    alpha_t = e^g_t

    from ``S_0 = kv0`` (zero by default), ``scale = 1/sqrt(Dk)`` by default and one gate per key
    dimension (or per head: ``g [.., 1]``). ``causal=False`` adds ViG's backward scan, the same
    recurrence from the last token to the first with ``backward_log_gate`` (the diagonal term
    counted by both scans). Returns ``o [B, T, Hq, Dv]`` (and ``S_T [B, Hkv, Dk, Dv]``)."""
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale

    def scan(gate: Tensor, steps: range, start: Tensor | None) -> tuple[Tensor, Tensor]:
        out = torch.zeros(B, T, Hq, Dv, dtype=q.dtype)
        finals = []
        for h in range(Hq):
            kv = h // group
            S = torch.zeros(B, Dk, Dv, dtype=q.dtype) if start is None else start[:, kv]
            for t in steps:
                alpha = gate[:, t, kv].exp()  # [B, Dk] or [B, 1]
                S = alpha.unsqueeze(-1) * S + k[:, t, kv, :, None] * v[:, t, kv, None, :]
                out[:, t, h] = scale * torch.einsum("bd,bde->be", q[:, t, h], S)
            if h % group == 0:
                finals.append(S)
        return out, torch.stack(finals, dim=1)

    out, S = scan(log_gate, range(T), kv0)
    if not causal:
        back = log_gate if backward_log_gate is None else backward_log_gate
        out = out + scan(back, range(T - 1, -1, -1), None)[0]
    return (out, S) if final_state else out


def check_every_form(
    fn: Callable[..., Tensor],
    inputs: dict[str, Tensor],
    *,
    chunk_sizes: tuple[int, ...] = (17, 20, 64),
    grads: bool = True,
    floor: float | None = None,
    **options,
) -> None:
    """Every form of ``fn(**inputs, form=..., chunk_size=..., **options)`` against
    ``gla_recurrence`` under the 2x rule (``floor`` as in ``check_function``): reference,
    recurrent and chunked at each chunk size, forward and backward (gradients of q, k, v, the
    gates and any initial state), and the forward alone, which runs the compiled kernels in
    float32."""
    forms = [("reference", 64), ("recurrent", 64)] + [("chunked", c) for c in chunk_sizes]

    def reference(**x: Tensor) -> Tensor:
        return gla_recurrence(**x, **options)

    for form, chunk_size in forms:

        def run(form: str = form, chunk_size: int = chunk_size, **x: Tensor) -> Tensor:
            return fn(**x, form=form, chunk_size=chunk_size, **options)

        for with_grads in (True, False) if grads else (False,):
            report = check_function(run, reference, inputs, grads=with_grads, floor=floor)
            assert report.ok, f"{form} chunk {chunk_size}, grads {with_grads}:\n{report}"


def with_state(q, k, v, log_gate, kv0, **options) -> Tensor:
    return gla(q, k, v, log_gate, initial_state=LinearState(kv0), **options)


@pytest.mark.parametrize("per_dim, strength", [(True, 1.0), (False, 1.0), (True, 40.0)])
def test_every_form_matches_the_recurrence(per_dim: bool, strength: float) -> None:
    # Strength 40: chunks decay past e^-SAFE_SPAN, so the secondary chunking runs; there 17 is
    # prime (sub-chunks of one token), 20 has sub-chunks of 10, 64 covers T in one chunk.
    x = inputs(per_dim=per_dim)
    x["log_gate"] = x["log_gate"] * strength
    # The parallel and chunked forms take decays as exp(b_i - b_j) of cumulative log-gates b,
    # whose float32 rounding is eps |b|: with gates this strong (|b| reaches ~1000 in 45
    # tokens) that exceeds the literal recurrence's own error, which multiplies by each
    # alpha_t, so the floor grows with |b|. At strength 1 the plain floor holds.
    span = x["log_gate"].double().sum(1).abs().max().item()
    floor = FLOORS[torch.float32] + torch.finfo(torch.float32).eps * span
    check_every_form(gla, x, floor=floor if strength > 1 else None)


def test_every_form_matches_the_recurrence_from_an_initial_state() -> None:
    x = inputs(T=30) | {"kv0": draw(2, 2, 16, 16)}
    check_every_form(with_state, x, chunk_sizes=(8,))


def test_every_form_matches_the_recurrence_with_a_scale_and_mqa() -> None:
    x = inputs(T=33, Hq=4, Hkv=1)
    check_every_form(gla, x, chunk_sizes=(16,), scale=0.3)


def test_final_state_is_the_recurrence_state() -> None:
    x = inputs(dtype=torch.float64, T=41) | {"kv0": draw(2, 2, 16, 16, dtype=torch.float64)}
    _, expected = gla_recurrence(**x, final_state=True)
    for form in ("reference", "chunked", "recurrent"):
        _, state = with_state(**x, form=form, chunk_size=16, return_state=True)
        torch.testing.assert_close(state.kv, expected)


def test_forms_agree() -> None:
    check_forms(gla, inputs(), chunk_sizes=(17, 64))


def test_both_intra_paths_agree() -> None:
    x = inputs(dtype=torch.float64)
    qc, kc, _, b = _chunks(x["q"].view(2, 45, 2, 2, 16), x["k"], x["v"], x["log_gate"], 16)
    torch.testing.assert_close(_intra_vector(qc, kc, b), _intra_vector_secondary(qc, kc, b))


def test_subchunk_sizes() -> None:
    assert [_subchunk(c) for c in (64, 20, 17, 7, 1)] == [16, 10, 1, 7, 1]


def test_strong_gates_stay_finite_in_float32() -> None:
    """Cumulative log-gates of -2000 over a chunk: every evaluated exponent stays <= 0."""
    x = inputs(dtype=torch.float64, T=70)
    x["log_gate"] = x["log_gate"] * 40 - 1.0
    exact = gla(**x, form="recurrent")
    got = gla(**{n: t.float() for n, t in x.items()}, chunk_size=64)
    assert torch.isfinite(got).all()
    assert (got.double() - exact).abs().max() < 1e-4 * exact.abs().max()


def test_state_passing() -> None:
    split_run(gla, inputs(dtype=torch.float64, T=41), cut=23, chunk_size=16)


def test_gates_one_is_linear_attention() -> None:
    x = inputs(dtype=torch.float64)
    x["log_gate"] = torch.zeros_like(x["log_gate"])
    plain = linear_attention(x["q"], x["k"], x["v"], feature_map="identity", normalize=False)
    torch.testing.assert_close(gla(**x, scale=1.0), plain)


def test_bidirectional_is_forward_plus_reversed_scan() -> None:
    x = inputs(dtype=torch.float64)
    back = gates(x["log_gate"].shape, torch.float64, seed=9)
    got = gla(**x, causal=False, backward_log_gate=back, chunk_size=8)
    forward = gla(**x)
    flipped = {n: t.flip(1) for n, t in x.items() if n != "log_gate"}
    reverse = gla(**flipped, log_gate=back.flip(1)).flip(1)
    torch.testing.assert_close(got, forward + reverse)
    x = inputs() | {"backward_log_gate": gates(x["log_gate"].shape, seed=9)}
    check_every_form(gla, x, chunk_sizes=(16,), causal=False)


def test_bfloat16_forward() -> None:
    check_every_form(gla, inputs(torch.bfloat16), chunk_sizes=(16,), grads=False)


def test_errors() -> None:
    x = inputs()
    with pytest.raises(ValueError, match=r"finite and <= 0"):
        gla(**(x | {"log_gate": -x["log_gate"]}))
    with pytest.raises(ValueError, match=r"log-gate must be \[B, T, Hkv, 1 or Dk\]"):
        gla(**(x | {"log_gate": x["log_gate"][..., :3]}))
    with pytest.raises(ValueError, match="backward_log_gate is for causal=False"):
        gla(**x, backward_log_gate=x["log_gate"])
    with pytest.raises(ValueError, match="bidirectional GLA sees the whole sequence"):
        gla(**x, causal=False, return_state=True)
