"""The block-sparse backend: both implementations (compiled kernel, batched matmuls), both exp
paths, both query tile shapes, many runs per row, per-head masks, refusals."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from functools import partial

import pytest
import torch

import attnkit
from attnkit import masks, positional, scores
from attnkit.backends import blocksparse, native
from attnkit.call import AttentionCall
from attnkit.testing import check_against_reference

run = partial(attnkit.attention, backend="blocksparse")


def inputs(T: int, q_scale: float = 1.0, dtype=torch.float32, Tq: int | None = None):
    g = torch.Generator().manual_seed(T)
    Tq = T if Tq is None else Tq
    q = torch.randn(2, Tq, 4, 16, generator=g) * q_scale
    k, v = (torch.randn(2, T, 2, 16, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.fixture(params=["kernel", "kernel_blas", "batched"])
def implementation(request, monkeypatch) -> Iterator[str]:
    """Run through the compiled kernel (its float32 GEMMs on brgemm where it works here, then on
    BLAS), then through the batched matmuls."""
    if request.param == "batched":
        monkeypatch.setattr(blocksparse, "_kernel", lambda call: None)
        yield "batched"
        return
    kernel = native.load("blocksparse_cpu")
    if kernel is None:
        pytest.skip(f"kernel unavailable: {native.unavailable('blocksparse_cpu')}")
    if request.param == "kernel_blas":
        kernel.use_brgemm(False)
        assert blocksparse.kernel_gemm(torch.float32) == "blas"
        assert blocksparse.kernel_gemm(torch.bfloat16) == "onednn_matmul"
    try:
        yield "kernel"
    finally:
        kernel.use_brgemm(True)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
def test_the_kernel_compiles_where_a_compiler_exists() -> None:
    assert native.load("blocksparse_cpu") is not None, native.unavailable("blocksparse_cpu")


LONG_MASKS = {
    "dense": lambda: None,
    "causal": masks.causal,
    "window": lambda: masks.sliding_window(150),
    "sinks_window": lambda: masks.sinks(4) | masks.sliding_window(100),
    "documents": lambda: (
        masks.documents(torch.tensor([[0] * 200 + [1] * 300 + [2] * 200, [0] * 500 + [1] * 200]))
        & masks.causal()
    ),
    "empty_rows": lambda: masks.causal() & masks.key_padding(torch.tensor([500, 0])),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("q_scale", [1.0, 20.0], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("name", LONG_MASKS)
def test_long_rows_with_many_runs_forward_and_backward(
    name: str, q_scale: float, dtype: torch.dtype, implementation: str
) -> None:
    q, k, v = inputs(700, q_scale, dtype)  # 3 query blocks, rows of up to 2 runs of 4 tiles
    mask = LONG_MASKS[name]()
    assert blocksparse.needs_shift(AttentionCall(q, k, v, mask=mask)) == (q_scale > 1)
    check_against_reference(run, q, k, v, mask=mask).assert_ok()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decoding(dtype: torch.dtype, implementation: str) -> None:
    q, k, v = inputs(700, Tq=3, dtype=dtype)
    check_against_reference(run, q, k, v, mask=masks.causal()).assert_ok()


def test_the_kernel_runs_float32_and_bfloat16_only() -> None:
    if native.load("blocksparse_cpu") is None:
        pytest.skip(f"kernel unavailable: {native.unavailable('blocksparse_cpu')}")
    q, k, v = inputs(64)
    for dtype, expected in ((torch.float32, True), (torch.bfloat16, True), (torch.float16, False)):
        x = (q.to(dtype), k.to(dtype), v.to(dtype))
        assert blocksparse.uses_kernel(AttentionCall(*x)) == expected
        assert (blocksparse.kernel_launch(AttentionCall(*x)) is not None) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", blocksparse.KERNEL_TILES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_tile_shape(
    shape: tuple[int, int], dtype: torch.dtype, implementation: str, monkeypatch
) -> None:
    monkeypatch.setattr(blocksparse, "KERNEL_TILES", (shape,))
    q, k, v = inputs(700, dtype=dtype)
    mask = masks.sinks(4) | masks.sliding_window(100)
    expected = shape if implementation == "kernel" else (blocksparse.BLOCK_Q, blocksparse.BLOCK_K)
    assert blocksparse.tile_shape(AttentionCall(q, k, v, mask=mask)) == expected
    check_against_reference(run, q, k, v, mask=mask).assert_ok()


def test_smaller_tiles_are_chosen_where_they_save_enough_pairs() -> None:
    if native.load("blocksparse_cpu") is None:
        pytest.skip(f"kernel unavailable: {native.unavailable('blocksparse_cpu')}")
    q = torch.randn(1, 8192, 1, 8)
    shape = {
        name: blocksparse.tile_shape(AttentionCall(q, q, q, mask=mask))
        for name, mask in (
            ("window", masks.sliding_window(255)),
            ("causal", masks.causal()),
            ("aligned_blocks", masks.chunked(512)),
        )
    }
    assert shape == {
        "window": (64, 64),  # 320 keys per row computed instead of 384 (128x128) or 512
        "causal": (256, 128),  # the diagonal's waste is under 5% at any of the shapes
        "aligned_blocks": (256, 128),  # every shape tiles 512-blocks exactly
    }
    # the kernel runs bfloat16 too; float16 runs the batched matmuls, whose tiles are fixed
    for dtype, expected in ((torch.bfloat16, (64, 64)), (torch.float16, (256, 128))):
        x = q.to(dtype)
        assert blocksparse.tile_shape(AttentionCall(x, x, x, mask=masks.sliding_window(255))) == (
            expected
        )


def test_per_head_masks(implementation: str) -> None:
    q, k, v = inputs(300)
    heads = torch.stack([masks.sliding_window(w).dense(300, 300)[0, 0] for w in (3, 40, 299, 0)])
    mask = masks.from_dense(heads[None])
    check_against_reference(run, q, k, v, mask=mask).assert_ok()


def test_scores_far_below_the_row_max_still_count(implementation: str) -> None:
    # The exp argument is clamped at -80 for speed; weights below e^-80 are below float32
    # rounding of the row sum, so the result must still match the reference.
    q, k, v = inputs(400, q_scale=60.0)
    check_against_reference(run, q, k, v, mask=masks.causal()).assert_ok()


def test_lse_is_returned(implementation: str) -> None:
    q, k, v = inputs(300)
    _, extra = run(q, k, v, mask=masks.causal(), aux=attnkit.Aux(lse=True))
    _, expected = attnkit.attention(
        q, k, v, mask=masks.causal(), backend="reference", aux=attnkit.Aux(lse=True)
    )
    torch.testing.assert_close(extra.lse, expected.lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", [None, masks.causal()], ids=["dense", "causal"])
def test_the_lse_carries_its_gradient(implementation: str, mask) -> None:
    """Split-KV decoding merges pieces by their lse, so dq and dk flow through it too."""
    q, k, v = (t.requires_grad_() for t in inputs(40, Tq=9))
    weights = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(3))

    def grads(backend: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, extra = attnkit.attention(*x, mask=mask, backend=backend, aux=attnkit.Aux(lse=True))
        loss = (extra.lse * weights.to(dtype)).sum() + out.sum()
        return torch.autograd.grad(loss, x)

    pairs = zip(grads("blocksparse", torch.float32), grads("reference", torch.float64), strict=True)
    for got, want in pairs:
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_refusals_name_the_alternative() -> None:
    q, k, v = inputs(64)
    for options, expected in (
        ({"score": scores.relu()}, "softmax, sigmoid, softplus-l1 and Cog only"),
        ({"bias": positional.grid_position_bias(4, (8, 8))}, "query-key offset only"),
    ):
        reason = blocksparse.BACKEND.supports(AttentionCall(q, k, v, **options))
        assert reason is not None and expected in reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("Tq", "Tk", "D", "Dv"),
    [(333, 333, 16, 24), (257, 301, 15, 9), (5, 301, 16, 16)],
    ids=["odd_Tk", "odd_D_and_Dv", "few_queries"],
)
def test_odd_sizes_and_short_query_blocks(
    Tq: int, Tk: int, D: int, Dv: int, dtype: torch.dtype, implementation: str
) -> None:
    """Odd Tk pads the bfloat16 GEMM's key pairs with a zero key; odd D or Dv, where those pairs
    cannot form, and few queries, where packing Kᵀ would not pay, take the unpacked GEMMs."""
    g = torch.Generator().manual_seed(Tq + Tk)
    q = torch.randn(1, Tq, 4, D, generator=g).to(dtype)
    k = torch.randn(1, Tk, 2, D, generator=g).to(dtype)
    v = torch.randn(1, Tk, 2, Dv, generator=g).to(dtype)
    mask = masks.sinks(3) | masks.sliding_window(90)
    check_against_reference(run, q, k, v, mask=mask).assert_ok()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("q_scale", [1.0, 20.0], ids=["mild", "large"])
@pytest.mark.parametrize("cap", [5.0, 100.0], ids=["cap_5", "cap_100"])
def test_soft_capped_scores_forward_and_backward(
    cap: float, q_scale: float, dtype: torch.dtype, implementation: str
) -> None:
    """Gemma 2's soft cap in the kernel: a cap of 5 bounds the scores (exp needs no shift); a cap
    of 100 with large scores takes the running max. The batched matmuls refuse it."""
    q, k, v = inputs(700, q_scale, dtype)
    call = AttentionCall(q, k, v, mask=masks.causal(), score=scores.softcap(cap))
    if implementation == "batched":
        reason = blocksparse.BACKEND.supports(call)
        assert reason is not None and "compiled kernel" in reason and "chunked" in reason
        return
    assert blocksparse.BACKEND.supports(call) is None
    assert blocksparse.needs_shift(call) == (cap == 100.0 and q_scale > 1)
    mask = masks.sinks(4) | masks.sliding_window(150)
    check_against_reference(run, q, k, v, mask=mask, score=scores.softcap(cap)).assert_ok()


def test_soft_caps_need_a_positive_scale() -> None:
    q, k, v = inputs(64)
    call = AttentionCall(q, k, v, score=scores.softcap(5.0), scale=-0.25)
    if native.load("blocksparse_cpu") is None:
        pytest.skip(f"kernel unavailable: {native.unavailable('blocksparse_cpu')}")
    reason = blocksparse.BACKEND.supports(call)
    assert reason is not None and "positive scale" in reason
