"""attnkit's eager code as one custom op inside ``torch.compile`` and ``torch.export`` graphs.

attnkit chooses a backend per call from the data (a documents mask's tiles depend on its
segment ids), builds cached tile structures and BlockMasks, and calls its own compiled C++
kernels: Python that a compiler cannot trace into a graph. Inside a graph being traced, such a
function runs as the custom op ``torch.ops.attnkit.eager(tensors, spec)`` instead: its inputs
are the tensors of the function's arguments, ``spec`` names the function and every other
argument (``attnkit.opspec``), and its kernel runs the function exactly as an eager call would.

A function is registered with ``@opaque(fake)``: it returns a list of tensors, and ``fake``
returns tensors of the same shapes, dtypes and strides from the arguments' shapes (it runs while
tracing, on fake tensors). A forward that autograd records keeps its graph, and the backward
differentiates through it, as eager autograd would (it recomputes the function only where that
graph is gone); the inputs that need no gradient get none.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

from attnkit.opspec import flatten, tensors_of, unflatten

Fn = TypeVar("Fn", bound=Callable[..., list[Tensor]])

#: Registered functions -> their fake implementation.
_FAKES: dict[Callable, Callable[..., list[Tensor]]] = {}

_BELOW_AUTOGRAD_KEYS = functools.reduce(
    operator.or_,
    (
        torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
        for key in (
            "AutogradFunctionality",
            "AutogradOther",
            "AutogradNestedTensor",
            "ADInplaceOrView",
        )
    ),
)


def opaque(fake: Callable[..., list[Tensor]]) -> Callable[[Fn], Fn]:
    """Register a module-level function ``fn(*args) -> list[Tensor]`` for ``call``, with
    ``fake(*args)`` giving its outputs' shapes, dtypes and strides without computing them."""

    def register(fn: Fn) -> Fn:
        _FAKES[fn] = fake
        return fn

    return register


def call(fn: Callable[..., list[Tensor]], *args: Any) -> list[Tensor]:
    """``fn(*args)``: in eager mode the function itself; inside a graph being traced
    (``torch.compile``, ``torch.export``) the op ``attnkit::eager`` that runs it."""
    if not torch.compiler.is_compiling():
        return fn(*args)
    if fn not in _FAKES:
        raise TypeError(
            f"{fn.__qualname__} is not registered with attnkit.opaque.opaque: decorate it with "
            "@opaque(fake) to run it inside a compiled graph"
        )
    # Which inputs autograd differentiates: the op's forward makes the same ones require grad
    # (with grad mode on), as in the eager call, so that choices that depend on it (a backend
    # without a backward, an inference-only kernel) are the eager call's, and the backward
    # differentiates the computation that ran.
    grad = torch.is_grad_enabled()
    requires_grad = tuple(grad and t.requires_grad for t in tensors_of(args))
    spec, tensors = flatten((fn, args, requires_grad))
    *outputs, _handle = _eager_op(tensors, spec)
    return outputs


@contextlib.contextmanager
def _as_in_eager(grad: bool) -> Iterator[None]:
    """Run an op's kernel as an eager call: PyTorch runs custom op kernels below autograd
    (autograd dispatch keys excluded), where a forward could not record the graph its backward
    differentiates, and where compiled FlexAttention's guards, which include tensors' dispatch
    keys, would compile it once more than for eager calls."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set() - _BELOW_AUTOGRAD_KEYS
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.set_grad_enabled(grad):
        yield


def _inputs(spec: str, tensors: list[Tensor]) -> tuple[Callable, tuple, list[Tensor]]:
    """The function, its arguments and their tensors, detached and requiring grad as when
    ``call`` was traced."""
    _, _, requires_grad = unflatten(spec, tensors)
    inputs = [
        t.detach().requires_grad_(need) for t, need in zip(tensors, requires_grad, strict=True)
    ]
    fn, args, _ = unflatten(spec, inputs)
    return fn, args, inputs


#: Autograd graphs of forwards run with grad, by handle, for their backward: ``(inputs,
#: outputs)``, the inputs the leaves. An entry leaves when its backward takes it or when its
#: handle tensor is freed (the compiled graph that saved it for the backward is gone).
_GRAPHS: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
_handles = itertools.count()


def _keep_graph(inputs: list[Tensor], outputs: list[Tensor]) -> Tensor:
    """A handle (an int64 scalar) to the autograd graph from ``inputs`` to ``outputs``."""
    key = next(_handles)
    handle = torch.tensor(key)
    _GRAPHS[key] = (inputs, outputs)
    weakref.finalize(handle, _GRAPHS.pop, key, None)
    return handle


@torch.library.custom_op("attnkit::eager", mutates_args=())
def _eager_op(tensors: list[Tensor], spec: str) -> list[Tensor]:
    """The function's outputs and a handle to the graph recorded for their backward (-1: none
    recorded)."""
    fn, args, inputs = _inputs(spec, tensors)
    grad = any(t.requires_grad for t in inputs)
    with _as_in_eager(grad):
        outputs = fn(*args)
    handle = _keep_graph(inputs, outputs) if grad else torch.tensor(-1)
    return [*_fresh(outputs, inputs), handle]


def _fresh(outputs: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """Outputs detached and contiguous, copied where one shares memory with an input or an
    earlier output or starts inside its storage: a custom op's outputs may alias neither, and
    compiled code addresses them as the fake outputs are laid out (contiguous, offset 0)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    fresh = []
    for out in outputs:
        out = out.detach().contiguous()
        storage = out.untyped_storage().data_ptr()
        if out.numel() and (storage in taken or out.storage_offset() != 0):
            out = out.clone()
        taken.add(out.untyped_storage().data_ptr())
        fresh.append(out)
    return fresh


@_eager_op.register_fake
def _eager_op_fake(tensors: list[Tensor], spec: str) -> list[Tensor]:
    fn, args, _ = unflatten(spec, tensors)
    return [*_FAKES[fn](*args), torch.empty((), dtype=torch.int64, device="cpu")]


@torch.library.custom_op("attnkit::eager_backward", mutates_args=())
def _eager_backward_op(
    grads: list[Tensor], tensors: list[Tensor], spec: str, handle: Tensor
) -> list[Tensor]:
    """Gradients of the function's outputs (weighted by ``grads``; an empty one stands for an
    output not differentiated) with respect to ``tensors``, through the forward's graph
    (``handle``), or by recomputing the function with autograd where that graph is gone (a
    second backward); an empty tensor for an input autograd does not differentiate."""
    graph = _GRAPHS.pop(int(handle), None)
    with _as_in_eager(grad=True):
        if graph is None:
            fn, args, inputs = _inputs(spec, tensors)
            graph = inputs, fn(*args)
        inputs, outputs = graph
        wanted = [t for t in inputs if t.requires_grad]
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, grads, strict=True)
            if grad.numel() and out.requires_grad
        ]
        found = iter(
            torch.autograd.grad(
                [out for out, _ in pairs], wanted, [grad for _, grad in pairs], allow_unused=True
            )
        )
    result = [next(found) if t.requires_grad else t.new_empty(0) for t in inputs]
    return [
        torch.zeros_like(t) if g is None else g.contiguous()
        for t, g in zip(inputs, result, strict=True)
    ]


@_eager_backward_op.register_fake
def _eager_backward_op_fake(grads, tensors, spec, handle):
    _, _, requires_grad = unflatten(spec, tensors)
    return [
        torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)
        for t, need in zip(tensors, requires_grad, strict=True)
    ]


def _save_for_backward(ctx, inputs, output) -> None:
    tensors, spec = inputs
    ctx.save_for_backward(*tensors, output[-1])
    ctx.spec = spec


def _backward(ctx, grads):
    *tensors, handle = ctx.saved_tensors
    _, _, requires_grad = unflatten(ctx.spec, tensors)
    grads = [g if g is not None else tensors[0].new_empty(0) for g in grads[:-1]]
    result = _eager_backward_op(grads, tensors, ctx.spec, handle)
    return [g if need else None for g, need in zip(result, requires_grad, strict=True)], None


_eager_op.register_autograd(_backward, setup_context=_save_for_backward)
