"""Shared fixtures: a from-scratch float64 attention formula that tests compare against."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from attnkit.backends import flex

# Tests must not depend on the machine they run on: auto ranks backends by the conservative
# cost table unless a test gives it one (attnkit.calibration.using); the calibration itself is
# tested on its own.
os.environ.setdefault("ATTNKIT_CALIBRATION", "off")


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    allowed: Tensor | None = None,
    bias: Tensor | None = None,
    weight: Callable[[Tensor], Tensor] = torch.exp,
    normalized: bool = True,
    scale: float | None = None,
) -> Tensor:
    """The attention operator (``attnkit.attention``) written out in float64, independent of
    attnkit:

        out[b, i, h] = sum_j w(scale q_i.k_j + bias[h, i, j]) allowed[b, h, i, j] v_j / Z_i

    ``q [B, Tq, Hq, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]``; query head ``h`` reads
    key/value head ``h // (Hq / Hkv)``. ``allowed`` broadcasts to ``[B, Hq, Tq, Tk]``, ``bias``
    to ``[Hq, Tq, Tk]``. ``Z_i = sum_j w_ij`` if ``normalized`` else 1; a row with ``Z_i = 0``
    gives 0.
    """
    q, k, v = q.detach().double(), k.detach().double(), v.detach().double()
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if bias is not None:
        s = s + bias.detach().double()
    w = weight(s)
    if allowed is not None:
        w = w * allowed
    if normalized:
        z = w.sum(-1, keepdim=True)
        w = torch.where(z > 0, w / torch.where(z > 0, z, 1.0), 0.0)
    return torch.einsum("bhij,bjhd->bihd", w, v)


@pytest.fixture
def formula() -> Callable[..., Tensor]:
    """``naive_attention``: the float64 formula tests check attnkit against."""
    return naive_attention


@contextlib.contextmanager
def uncompiled(backend: str) -> Iterator[None]:
    """Run ``backend`` without compiling kernels where it can (flex's ``eager()``), so tests
    that only check numbers do not pay seconds of compile time per variant."""
    eager = getattr(flex, "eager", None)
    with eager() if backend == "flex" and eager is not None else contextlib.nullcontext():
        yield


@pytest.fixture
def backend_context() -> Callable[[str], contextlib.AbstractContextManager]:
    """``uncompiled``: ``with backend_context(name): ...`` runs a backend without compiling."""
    return uncompiled


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip, with the reason, where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
