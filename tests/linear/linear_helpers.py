"""Shared checks for the linear/recurrent family: every form against the reference under the
2x rule (``attnkit.testing.check_function``), and state passing."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnkit.testing import Case, check_function


def qkv(
    B: int = 2,
    T: int = 45,
    Hq: int = 4,
    Hkv: int = 2,
    D: int = 16,
    Dv: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Asymmetric seeded ``q, k, v`` (shifted means, per-head scales) as an inputs dict."""
    q, k, v = Case("linear", B, T, T, Hq, Hkv, D, Dv).make(dtype, seed=seed, requires_grad=False)
    return {"q": q, "k": k, "v": v}


def draw(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def check_forms(
    fn: Callable[..., Tensor],
    inputs: dict[str, Tensor],
    *,
    chunk_sizes: tuple[int, ...] = (7, 16, 64),
    recurrent: bool = True,
    grads: bool = True,
) -> None:
    """``fn(**inputs, form=..., chunk_size=...)``: chunked (each chunk size, forward and
    backward, and forward alone, which takes the compiled kernel where one applies) and
    recurrent (forward) against the reference under the 2x rule."""

    def form(name: str, chunk_size: int = 64) -> Callable[..., Tensor]:
        return lambda **x: fn(**x, form=name, chunk_size=chunk_size)

    reference = form("reference")
    for chunk_size in chunk_sizes:
        check_function(form("chunked", chunk_size), reference, inputs, grads=grads).assert_ok()
        if grads:
            check_function(form("chunked", chunk_size), reference, inputs, grads=False).assert_ok()
    if recurrent:
        check_function(form("recurrent"), reference, inputs, grads=False).assert_ok()


def split_run(
    fn: Callable[..., tuple[Tensor, object]],
    sequence: dict[str, Tensor],
    cut: int,
    forms: tuple[str, ...] = ("chunked", "recurrent", "reference"),
    **options,
) -> None:
    """Running ``[0:cut]`` then ``[cut:T]`` with the carried state equals running ``[0:T]``
    (output and final state), for every form of the second part. ``sequence`` holds the
    per-token tensors (split along dim 1)."""
    full, full_state = fn(**sequence, return_state=True, **options)
    head = {name: t[:, :cut] for name, t in sequence.items()}
    tail = {name: t[:, cut:] for name, t in sequence.items()}
    first, state = fn(**head, return_state=True, **options)
    for form in forms:
        second, final = fn(**tail, initial_state=state, return_state=True, form=form, **options)
        torch.testing.assert_close(torch.cat([first, second], dim=1), full)
        assert_states_close(final, full_state)


def assert_states_close(a: object, b: object) -> None:
    """Field-by-field comparison of two state dataclasses (nested ones included)."""
    assert type(a) is type(b)
    for name, x in vars(a).items():
        y = getattr(b, name)
        if isinstance(x, Tensor):
            torch.testing.assert_close(x, y)
        elif hasattr(x, "__dataclass_fields__"):
            assert_states_close(x, y)
        else:
            assert x == y, name
