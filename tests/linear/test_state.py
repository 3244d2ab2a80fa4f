"""Chunk-boundary states (LASP-2 readiness): ``chunk_states`` and ``combine_states``."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import qkv

from attnkit import linear
from attnkit.linear import LinearState, chunk_states, combine_states

STATEFUL = ["linear_attention", "lightning_attention", "retention", "gla", "based"]


def run_state(name, x, T):
    """The final state after the first ``T`` tokens, from the mechanism itself."""
    mechanism = linear.MECHANISMS[name]
    inputs = mechanism.inputs(**x)
    prefix = {
        n: (t[:, :T] if torch.is_tensor(t) and t.dim() == 4 else t) for n, t in inputs.items()
    }
    _, state = mechanism.fn(**prefix, return_state=True)
    return getattr(state, "linear", state)


@pytest.mark.parametrize("name", STATEFUL)
def test_boundaries_are_the_states_after_each_chunk(name: str) -> None:
    x = qkv(T=27, dtype=torch.float64)
    states = chunk_states(name, **x, chunk_size=8)
    assert states.num_chunks == 4
    for n, T in enumerate([8, 16, 24, 27], start=1):
        expected = run_state(name, x, T)
        torch.testing.assert_close(states.state(n).kv, expected.kv)
        if expected.z is not None:
            torch.testing.assert_close(states.state(n).z, expected.z)


@pytest.mark.parametrize("name", STATEFUL)
def test_combine_rebuilds_the_boundaries(name: str) -> None:
    x = qkv(T=30, dtype=torch.float64)
    initial = chunk_states(name, **x, chunk_size=30).state(1)
    states = chunk_states(name, **x, chunk_size=7, initial_state=initial)
    rebuilt = combine_states(states.update_kv, states.log_decay, initial.kv)
    torch.testing.assert_close(rebuilt, states.kv)
    if states.z is not None:
        rebuilt_z = combine_states(
            states.update_z.unsqueeze(-1), states.log_decay, initial.z.unsqueeze(-1)
        )
        torch.testing.assert_close(rebuilt_z.squeeze(-1), states.z)


def test_lasp2_two_ranks_exchange_states_not_keys() -> None:
    """Two "ranks" each own half the sequence: rank 1 needs only rank 0's chunk contribution
    and decay (all-gathered), combined with ``combine_states``, to run its half exactly."""
    x = qkv(T=40, dtype=torch.float64)
    gate = linear.MECHANISMS["gla"].extras(**x)["log_gate"]
    full = linear.gla(**x, log_gate=gate)
    halves = [
        {n: t[:, s] for n, t in (x | {"log_gate": gate}).items()}
        for s in (slice(0, 20), slice(20, 40))
    ]
    local = [chunk_states("gla", **h, chunk_size=20) for h in halves]
    gathered = torch.cat([s.update_kv for s in local], dim=1)
    decays = torch.cat([s.log_decay for s in local], dim=1)
    entering = combine_states(gathered, decays, None)[:, 1]
    second = linear.gla(**halves[1], initial_state=LinearState(entering))
    torch.testing.assert_close(second, full[:, 20:])


def test_no_decay_is_a_prefix_sum() -> None:
    updates = torch.randn(2, 5, 3, 4, 6, dtype=torch.float64)
    states = combine_states(updates, None, None)
    torch.testing.assert_close(states[:, 1:], updates.cumsum(1))
    assert states[:, 0].abs().max() == 0


def test_errors() -> None:
    x = qkv()
    with pytest.raises(ValueError, match="aaren has no linear state"):
        chunk_states("aaren", **x)
    with pytest.raises(ValueError, match="only causal mechanisms"):
        chunk_states("linear_attention", **x, causal=False)
    with pytest.raises(KeyError, match="no linear mechanism named 'mamba'"):
        chunk_states("mamba", **x)
