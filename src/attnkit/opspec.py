"""A call's options as one string and a list of tensors, so that a custom op can carry them.

A ``torch.library`` custom op takes tensors, numbers and strings, not Python objects. To pass a
mask, a score function, a bias or an ``Aux`` through one inside ``torch.compile`` or
``torch.export``, ``flatten`` splits the objects into their tensors (op inputs, which the
compiler tracks: a documents mask built from each batch's segment ids is one graph for every
batch) and a *spec*, a string naming every class and constant, from which ``unflatten``
rebuilds equal objects around the tensors the op receives.

An object's state is its public instance attributes; attributes with a leading underscore are
caches the object rebuilds on demand, and are not carried. Classes and functions are named by
import path where importing that path gives them back, so a spec stays valid in a new process
(a saved ``torch.export`` program); anything else (a lambda or closure ``mask_mod``) is kept
in this process's table of local objects and the spec names its entry.

``flatten`` is plain Python that ``torch.compile`` traces, and the spec becomes a constant of
the graph (``torch.compiler.assume_constant_result``): the compiler guards on the constants it
read, so a different window size compiles anew while new tensors of the same shapes do not.
"""

from __future__ import annotations

import ast
import functools
import importlib
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_SCALARS = (bool, int, float, str, type(None))

#: Objects a spec cannot name by import path, by their index in specs ("local", index).
_LOCAL: list[object] = []


def _static(value: bool | int | float | str | None) -> bool | int | float | str | None:
    """``value`` itself. Under ``torch.compile`` this makes a number read from the compiled
    function's arguments a constant of the graph: the compiler turns such a number into a
    symbol once it has seen it change (automatic dynamic), and a spec must be a constant.
    ``operator.index`` and ``math.fsum`` are functions it evaluates on the number's value,
    guarding on it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, int):
        return operator.index(value)
    return math.fsum((value,))


def _tree(obj: Any, tensors: list[Tensor]) -> tuple:
    """``obj`` as a tree of tagged tuples; its tensors are appended to ``tensors``."""
    if isinstance(obj, Tensor):
        tensors.append(obj)
        return ("tensor", len(tensors) - 1)
    if isinstance(obj, _SCALARS):
        return ("value", _static(obj))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(_tree(item, tensors) for item in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((key, _tree(value, tensors)) for key, value in obj.items()))
    if isinstance(obj, slice):
        return ("slice", tuple(_tree(end, tensors) for end in (obj.start, obj.stop, obj.step)))
    if callable(obj) or not hasattr(obj, "__dict__"):
        return ("named", obj)
    state = tuple(
        (name, _tree(value, tensors))
        for name, value in vars(obj).items()
        if not name.startswith("_")
    )
    return ("object", type(obj), state)


def _lookup(path: str) -> Any:
    """The object at ``module:qualname``."""
    module, qualname = path.split(":")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _import_path(obj: object) -> str | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module is None or "<" in qualname:
        return None
    path = f"{module}:{qualname}"
    try:
        found = _lookup(path)
    except (ImportError, AttributeError):
        return None
    return path if found is obj else None


def _local_index(obj: object) -> int:
    for index, known in enumerate(_LOCAL):
        if known is obj:
            return index
    _LOCAL.append(obj)
    return len(_LOCAL) - 1


def _name(obj: object) -> tuple:
    """A literal that ``_resolve`` turns back into ``obj``."""
    if isinstance(obj, torch.dtype):
        return ("dtype", str(obj).removeprefix("torch."))
    if isinstance(obj, torch.device):
        return ("device", str(obj))
    path = _import_path(obj)
    return ("path", path) if path is not None else ("local", _local_index(obj))


def _rewritten(node: tuple, leaf: Callable[[tuple], tuple], name: Callable[[Any], Any]) -> tuple:
    """``node`` with each leaf (a value or tensor slot) mapped by ``leaf`` and each class or
    function by ``name``; the containers' structure kept."""
    tag = node[0]
    if tag in ("tuple", "list", "slice"):
        return (tag, tuple(_rewritten(item, leaf, name) for item in node[1]))
    if tag == "dict":
        return (tag, tuple((key, _rewritten(value, leaf, name)) for key, value in node[1]))
    if tag == "named":
        return (tag, name(node[1]))
    if tag == "object":
        state = tuple((key, _rewritten(value, leaf, name)) for key, value in node[2])
        return (tag, name(node[1]), state)
    return leaf(node)


def _literal_leaf(node: tuple) -> tuple:
    if node[0] == "value" and isinstance(node[1], float) and not math.isfinite(node[1]):
        return ("float", repr(node[1]))  # repr(inf) is no literal
    return node


def _parsed_leaf(node: tuple) -> tuple:
    return ("value", float(node[1])) if node[0] == "float" else node


@torch.compiler.assume_constant_result
def _encode(tree: tuple) -> str:
    return repr(_rewritten(tree, _literal_leaf, _name))


def _resolve(name: tuple) -> object:
    """The inverse of ``_name``."""
    kind, what = name
    if kind == "dtype":
        return getattr(torch, what)
    if kind == "device":
        return torch.device(what)
    if kind == "local":
        return _LOCAL[what]
    return _lookup(what)


@functools.lru_cache(maxsize=256)
def _decode(spec: str) -> tuple:
    return _rewritten(ast.literal_eval(spec), _parsed_leaf, _resolve)


def _build(node: tuple, tensors: list[Tensor]) -> Any:
    tag = node[0]
    if tag == "tensor":
        return tensors[node[1]]
    if tag in ("value", "named"):
        return node[1]
    if tag == "tuple":
        return tuple(_build(item, tensors) for item in node[1])
    if tag == "list":
        return [_build(item, tensors) for item in node[1]]
    if tag == "slice":
        return slice(*(_build(end, tensors) for end in node[1]))
    if tag == "dict":
        return {key: _build(value, tensors) for key, value in node[1]}
    cls, state = node[1], node[2]
    obj = cls.__new__(cls)
    obj.__dict__.update({key: _build(value, tensors) for key, value in state})
    return obj


def flatten(obj: Any) -> tuple[str, list[Tensor]]:
    """``(spec, tensors)``: everything in ``obj`` (nested tuples, lists, dicts and objects)
    but its tensors as a string, and the tensors in the order ``unflatten`` takes them."""
    tensors: list[Tensor] = []
    return _encode(_tree(obj, tensors)), tensors


def tensors_of(obj: Any) -> list[Tensor]:
    """The tensors ``flatten(obj)`` would return, in the same order."""
    tensors: list[Tensor] = []
    _tree(obj, tensors)
    return tensors


def unflatten(spec: str, tensors: list[Tensor]) -> Any:
    """The object ``flatten`` split into ``spec`` and ``tensors``, rebuilt around ``tensors``
    (new objects with equal state; the same tensors)."""
    return _build(_decode(spec), list(tensors))
