"""``attnkit.opaque``: a registered function as one op in compiled graphs, its backward through
the graph the forward recorded, and that graph's lifetime."""

from __future__ import annotations

import gc

import pytest
import torch

from attnkit import opaque

CALLS = {"count": 0}


def _scaled_fake(x: torch.Tensor, factor: float) -> list[torch.Tensor]:
    return [torch.empty_like(x), torch.empty_like(x)]


@opaque.opaque(_scaled_fake)
def scaled(x: torch.Tensor, factor: float) -> list[torch.Tensor]:
    CALLS["count"] += 1
    return [x * factor, x.square()]


def unregistered(x: torch.Tensor) -> list[torch.Tensor]:
    return [x]


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    CALLS["count"] = 0
    yield
    torch._dynamo.reset()


def f(x):
    a, b = opaque.call(scaled, x, 3.0)
    return a + b


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_the_backward_reuses_the_forwards_graph_and_lets_it_go(backend: str) -> None:
    x = torch.randn(5, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    out = compiled(x)
    assert CALLS["count"] == 1 and len(opaque._GRAPHS) == 1
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert CALLS["count"] == 1  # no recomputation
    assert not opaque._GRAPHS
    torch.testing.assert_close(grad, 3.0 + 2 * x.detach())


def test_a_graph_without_backward_is_freed_with_its_outputs() -> None:
    x = torch.randn(5, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert len(opaque._GRAPHS) == 1
    del out
    gc.collect()
    assert not opaque._GRAPHS


def test_no_graph_is_kept_without_grad() -> None:
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(torch.randn(5, requires_grad=True))
    assert not opaque._GRAPHS


def test_eager_calls_run_the_function_itself() -> None:
    x = torch.randn(3)
    assert torch.equal(opaque.call(scaled, x, 2.0)[0], x * 2.0)


def test_an_unregistered_function_is_refused_while_tracing() -> None:
    def g(x):
        return opaque.call(unregistered, x)[0]

    with pytest.raises(Exception, match=r"not registered with attnkit\.opaque"):
        torch.compile(g, fullgraph=True, backend="aot_eager")(torch.randn(3))
