"""Shared checks for the structured-mask tests: brute-force tile kinds, soundness, and
running a mask on every backend against the reference."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

import attnkit
from attnkit import testing
from attnkit.backends import flex
from attnkit.masks import EMPTY, FULL, PARTIAL, Mask

#: (Tq, Tk, block_q, block_k): odd sizes, tiles that do not divide T, Tq < Tk, decoding.
TILINGS = {
    "b8x16": (8, 16),
    "b5x7": (5, 7),
    "b1x3": (1, 3),
    "b13x4": (13, 4),
}


def brute_force_kinds(dense: Tensor, block_q: int, block_k: int) -> Tensor:
    """Tile kinds ``[Bm, Hm, nq, nk]`` from every pair of ``dense`` ``[Bm, Hm, Tq, Tk]``
    (padded to whole tiles: True for the ``all`` test, False for the ``any`` test)."""
    Bm, Hm, Tq, Tk = dense.shape
    nq, nk = -(-Tq // block_q), -(-Tk // block_k)
    pad = (0, nk * block_k - Tk, 0, nq * block_q - Tq)

    def tiles(value: bool) -> Tensor:
        padded = torch.nn.functional.pad(dense, pad, value=value)
        return padded.view(Bm, Hm, nq, block_q, nk, block_k).transpose(3, 4).flatten(4)

    all_true, any_true = tiles(True).all(-1), tiles(False).any(-1)
    return torch.where(all_true, FULL, torch.where(any_true, PARTIAL, EMPTY)).to(torch.int8)


def assert_blocks_exact(mask: Mask, Tq: int, Tk: int) -> None:
    """The analytic block structure equals brute force for every tiling in ``TILINGS``."""
    dense = mask.dense(Tq, Tk)
    for bq, bk in TILINGS.values():
        kinds = mask.blocks(Tq, Tk, bq, bk).kinds
        expected = brute_force_kinds(dense, bq, bk)
        assert kinds.dtype == torch.int8
        assert kinds.shape == expected.shape, (bq, bk)
        assert torch.equal(kinds, expected), f"{mask!r}: tiles {bq}x{bk} differ from brute force"


def assert_blocks_sound(mask: Mask, Tq: int, Tk: int) -> float:
    """FULL tiles are full and EMPTY tiles empty; returns the fraction classified exactly."""
    dense = mask.dense(Tq, Tk)
    exact = []
    for bq, bk in TILINGS.values():
        kinds = mask.blocks(Tq, Tk, bq, bk).kinds
        expected = brute_force_kinds(dense, bq, bk)
        assert torch.all(expected[kinds == FULL] == FULL)
        assert torch.all(expected[kinds == EMPTY] == EMPTY)
        exact.append((kinds == expected).float().mean().item())
    return min(exact)


def dense_from(rule: Callable[..., bool], Tq: int, Tk: int, heads: int = 1) -> Tensor:
    """``[1, heads, Tq, Tk]`` bool from ``rule(h, p, k)`` over aligned positions (loops)."""
    out = torch.zeros(1, heads, Tq, Tk, dtype=torch.bool)
    for h in range(heads):
        for i in range(Tq):
            p = i + Tk - Tq
            for k in range(Tk):
                out[0, h, i, k] = bool(rule(h, p, k))
    return out


def check_backends(
    mask: Mask,
    case: testing.Case,
    backends: tuple[str, ...] = ("reference", "sdpa", "chunked"),
    flex_forward: bool = True,
) -> None:
    """Forward and backward on ``backends`` under the 2x rule; flex forward uncompiled (the
    same mask_mod and BlockMask; compiled runs are in the slow test file)."""
    q, k, v = case.make()
    for backend in backends:
        run = partial(attnkit.attention, backend=backend)
        testing.check_against_reference(run, q, k, v, mask=mask).assert_ok()
    if flex_forward:
        with flex.eager():
            run = partial(attnkit.attention, backend="flex")
            testing.check_against_reference(run, q, k, v, mask=mask, grads=False).assert_ok()


def natten_window_start(i: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's classic ``get_window_start`` (odd kernel, stride 1, non-causal), as in its
    CPU kernels: dilation groups and the inward shift at both borders."""
    half = kernel // 2
    if dilation <= 1:
        return max(i - half, 0) + (i + half >= length) * (length - i - half - 1)
    if i - half * dilation < 0:
        return i % dilation
    if i + half * dilation >= length:
        residue = i % dilation
        whole = (length // dilation) * dilation
        extra = length - whole
        if residue < extra:
            return length - extra + residue - 2 * half * dilation
        return whole + residue - kernel * dilation
    return i - half * dilation


def classic_keys(x: int, length: int, kernel: int, dilation: int) -> set[int]:
    start = natten_window_start(x, length, kernel, dilation)
    return {start + j * dilation for j in range(kernel)}
