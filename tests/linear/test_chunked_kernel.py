"""The compiled chunked kernel (forward; float32 and bfloat16 inputs; no gate, scalar or
per-dimension gates; feature maps applied in the kernel) against the PyTorch chunked form and
the reference, on the cases that stress it: strong decay (the per-pair exp path), GQA, chunk
sizes that do not divide T, an initial state, normalisation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from attnkit.backends import native
from attnkit.linear import chunked
from attnkit.linear.chunked import LinearProblem, solve
from attnkit.linear.state import LinearState
from attnkit.testing import check_function

pytestmark = pytest.mark.skipif(
    native.load("linear_cpu") is None,
    reason=f"kernel unavailable: {native.unavailable('linear_cpu')}",
)


def _problem(gate_scale: float | None, normalize: bool, **tensors) -> LinearProblem:
    g = tensors.get("log_gate")
    return LinearProblem(
        tensors["q"], tensors["k"], tensors["v"],
        None if gate_scale is None else g, scale=0.25, normalize=normalize,
    )  # fmt: skip


def _inputs(
    T: int, gate_scale: float | None, normalize: bool, gate_width: int = 1
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, T, 6, 16, generator=g)
    k = torch.randn(2, T, 2, 16, generator=g)
    v = torch.randn(2, T, 2, 12, generator=g)
    if normalize:  # positive features, as a feature map would give
        q, k = q.abs() + 0.1, k.abs() + 0.1
    x = {"q": q, "k": k, "v": v}
    if gate_scale is not None:
        x["log_gate"] = -torch.rand(2, T, 2, gate_width, generator=g) * gate_scale
    return x


GATES = {  # (log-gate magnitude, width): none, per head, per key dimension; mild and strong
    "no_gate": (None, 1),
    "scalar_mild": (0.05, 1),
    "scalar_strong": (4.0, 1),
    "vector_mild": (0.05, 16),
    "vector_strong": (4.0, 16),
}


@pytest.fixture(params=["brgemm", "blas"])
def gemm(request) -> Iterator[str]:
    """The kernel's GEMMs on oneDNN's brgemm (where it runs here), then on the BLAS."""
    kernel = native.load("linear_cpu")
    kernel.use_brgemm(request.param == "brgemm")
    try:
        if kernel.float32_gemm() != request.param:
            pytest.skip(f"{request.param} does not run on this CPU")
        yield request.param
    finally:
        kernel.use_brgemm(True)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_kernel_matches_reference(gate: str, normalize: bool, chunk_size: int, gemm: str) -> None:
    gate_scale, gate_width = GATES[gate]
    x = _inputs(150, gate_scale, normalize, gate_width)
    assert chunked._kernel(_problem(gate_scale, normalize, **x), "chunked") is not None

    def form(name: str):
        return lambda **y: solve(_problem(gate_scale, normalize, **y), form=name,
                                 chunk_size=chunk_size)  # fmt: skip

    check_function(form("chunked"), form("reference"), x, grads=False).assert_ok()


def test_initial_and_final_state_match_the_pytorch_form(monkeypatch) -> None:
    x = _inputs(90, 0.5, False)
    problem = _problem(0.5, False, **x)
    g = torch.Generator().manual_seed(3)
    state = LinearState(torch.randn(2, 2, 16, 12, generator=g))
    out, final = solve(problem, chunk_size=16, initial_state=state, return_state=True)
    monkeypatch.setattr(chunked, "_kernel", lambda *args: None)
    expected, expected_final = solve(problem, chunk_size=16, initial_state=state,
                                     return_state=True)  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.kv, expected_final.kv, rtol=1e-5, atol=1e-5)


def test_gradients_float64_and_other_forms_take_the_pytorch_form() -> None:
    x = _inputs(40, 0.5, False)
    assert chunked._kernel(_problem(0.5, False, **x), "chunked") is not None
    assert chunked._kernel(_problem(0.5, False, **x), "reference") is None
    grad = x | {"q": x["q"].clone().requires_grad_()}
    assert chunked._kernel(_problem(0.5, False, **grad), "chunked") is None
    as64 = {name: t.double() for name, t in x.items()}
    assert chunked._kernel(_problem(0.5, False, **as64), "chunked") is None


@pytest.mark.parametrize("gate", ["no_gate", "scalar_mild", "vector_mild"])
def test_bfloat16_inputs_are_read_by_the_kernel(gate: str, gemm: str) -> None:
    gate_scale, gate_width = GATES[gate]
    x = _inputs(150, gate_scale, True, gate_width)
    x = {name: t.bfloat16() if name != "log_gate" else t for name, t in x.items()}
    problem = _problem(gate_scale, True, **x)
    assert chunked._kernel(problem, "chunked") is not None
    assert solve(problem, chunk_size=64).dtype == torch.bfloat16

    def form(name: str):
        return lambda **y: solve(_problem(gate_scale, True, **y), form=name, chunk_size=64)

    check_function(form("chunked"), form("reference"), x, grads=False).assert_ok()


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_elementwise_feature_maps_applied_in_the_kernel(
    feature_map: str, dtype: torch.dtype, gemm: str
) -> None:
    g = torch.Generator().manual_seed(9)
    x = {
        "q": torch.randn(2, 100, 4, 8, generator=g).to(dtype),
        "k": torch.randn(2, 100, 2, 8, generator=g).to(dtype),
        "v": torch.randn(2, 100, 2, 8, generator=g).to(dtype),
    }

    def form(name: str):
        return lambda **y: solve(
            LinearProblem(**y, normalize=True, feature_map=feature_map), form=name,
            chunk_size=16,
        )  # fmt: skip

    problem = LinearProblem(**x, normalize=True, feature_map=feature_map)
    assert chunked._kernel(problem, "chunked") is not None and problem.state_dim == 8
    check_function(form("chunked"), form("reference"), x, grads=False).assert_ok()


@pytest.mark.parametrize("chunk_size", [7, 64])
def test_taylor_features_built_in_the_kernel_match_the_reference(
    chunk_size: int, gemm: str
) -> None:
    g = torch.Generator().manual_seed(5)
    x = {
        "q": torch.randn(2, 100, 4, 4, generator=g),
        "k": torch.randn(2, 100, 2, 4, generator=g),
        "v": torch.randn(2, 100, 2, 8, generator=g),
    }

    def form(name: str):
        return lambda **y: solve(
            LinearProblem(**y, normalize=True, feature_map="taylor"), form=name,
            chunk_size=chunk_size,
        )  # fmt: skip

    problem = LinearProblem(**x, normalize=True, feature_map="taylor")
    assert problem.state_dim == 1 + 4 + 16
    assert chunked._kernel(problem, "chunked") is not None
    check_function(form("chunked"), form("reference"), x, grads=False).assert_ok()


def test_feature_map_errors_name_the_choices() -> None:
    x = _inputs(20, None, False)
    with pytest.raises(ValueError, match="taylor"):
        LinearProblem(**x, feature_map="cosine")
    with pytest.raises(ValueError, match="takes no log-gate"):
        LinearProblem(**x, log_gate=-torch.ones(2, 20, 2, 1), feature_map="taylor")


# -- the recurrent form's kernel -------------------------------------------------------------


def _one_head_inputs(
    T: int, Dv: int, gate: str, dtype: torch.dtype, groups: int = 1
) -> dict[str, torch.Tensor]:
    """3 KV heads, each read by ``groups`` query heads."""
    g = torch.Generator().manual_seed(T + Dv)
    x = {name: torch.randn(2, T, heads, d, generator=g).to(dtype) for name, heads, d in
         (("q", 3 * groups, 16), ("k", 3, 16), ("v", 3, Dv))}  # fmt: skip
    gate_scale, width = GATES[gate]
    if gate_scale is not None:
        x["log_gate"] = -torch.rand(2, T, 3, width, generator=g) * gate_scale
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# Dv: 1, 4, 8 and 13 vectors per state row with AVX-512 (twice as many with AVX2), so rows of
# one slab and of several; G: slabs of at most 8, 4, 4, 2, 2 vectors (half with AVX2).
@pytest.mark.parametrize("Dv", [12, 64, 128, 200])
@pytest.mark.parametrize("gate", ["no_gate", "scalar_strong", "vector_mild"])
@pytest.mark.parametrize("groups", [1, 2, 3, 5, 8], ids=lambda g: f"G{g}")
def test_recurrent_kernel_matches_reference(
    groups: int, gate: str, Dv: int, dtype: torch.dtype
) -> None:
    x = _one_head_inputs(37, Dv, gate, dtype, groups)  # odd T: the last token runs alone

    # feature maps come without gates (LinearProblem refuses both at once)
    cases = [("elu", True), ("relu", False)] if gate == "no_gate" else [(None, False)]
    for feature_map, normalize in cases:

        def form(name: str, feature_map=feature_map, normalize=normalize):
            return lambda **y: solve(
                LinearProblem(**y, scale=0.25, normalize=normalize, feature_map=feature_map),
                form=name,
            )

        problem = LinearProblem(**x, normalize=normalize, feature_map=feature_map)
        assert chunked._kernel_entry(problem, "recurrent") == "recurrent"
        assert chunked._kernel(problem, "recurrent") is not None
        check_function(form("recurrent"), form("reference"), x, grads=False).assert_ok()


def _kernel_carries_the_state_like_the_pytorch_form(
    problem: LinearProblem, state: LinearState, monkeypatch, threads: int | None = None
) -> None:
    """The recurrent kernel (on ``threads`` threads) against the PyTorch recurrence, output and
    final state, from ``state``."""
    assert chunked._kernel(problem, "recurrent") is not None
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        out, final = solve(problem, form="recurrent", initial_state=state, return_state=True)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(chunked, "_kernel", lambda *args: None)
    expected, expected_final = solve(
        problem, form="recurrent", initial_state=state, return_state=True
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.kv, expected_final.kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.z, expected_final.z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
def test_recurrent_kernel_carries_the_state_like_the_pytorch_form(monkeypatch, groups) -> None:
    x = _one_head_inputs(30, 8, "scalar_mild", torch.float32, groups)
    x["q"], x["k"] = x["q"].abs(), x["k"].abs()  # positive, as a feature map would give
    g = torch.Generator().manual_seed(4)
    state = LinearState(torch.rand(2, 3, 16, 8, generator=g), torch.rand(2, 3, 16, generator=g))
    _kernel_carries_the_state_like_the_pytorch_form(
        LinearProblem(**x, normalize=True), state, monkeypatch
    )


@pytest.mark.parametrize("Dv", [12, 40, 64, 128])  # 1, 3, 4 and 8 vectors: 1, 3, 4, 4 parts
@pytest.mark.parametrize("groups", [1, 3])
def test_recurrent_kernel_splits_the_state_columns_over_spare_threads(
    monkeypatch, Dv: int, groups: int
) -> None:
    g = torch.Generator().manual_seed(Dv)
    x = {name: torch.randn(1, 37, heads, d, generator=g).abs() for name, heads, d in
         (("q", groups, 16), ("k", 1, 16), ("v", 1, Dv))}  # fmt: skip
    x["log_gate"] = -torch.rand(1, 37, 1, 16, generator=g) * 0.1
    state = LinearState(torch.rand(1, 1, 16, Dv, generator=g), torch.rand(1, 1, 16, generator=g))
    # one KV head and four threads: each head's columns are cut in parts
    _kernel_carries_the_state_like_the_pytorch_form(
        LinearProblem(**x, normalize=True), state, monkeypatch, threads=4
    )


def test_recurrent_kernel_scope() -> None:
    x = _one_head_inputs(8, 8, "no_gate", torch.float32)
    most_groups = 3 * chunked.recurrent_kernel_max_groups()
    assert most_groups > 0
    gqa = x | {"q": torch.randn(2, 8, most_groups, 16)}
    too_many = x | {"q": torch.randn(2, 8, most_groups + 3, 16)}
    assert chunked._kernel_entry(LinearProblem(**gqa), "recurrent") == "recurrent"
    assert chunked._kernel_entry(LinearProblem(**too_many), "recurrent") is None
    taylor = LinearProblem(**x, feature_map="taylor")
    assert chunked._kernel_entry(taylor, "recurrent") == "recurrent"
    assert chunked._kernel_entry(taylor, "chunked") == "forward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [1, 2])
def test_recurrent_kernel_builds_taylor_features(dtype: torch.dtype, groups: int) -> None:
    g = torch.Generator().manual_seed(6)
    x = {name: torch.randn(2, 41, heads, d, generator=g).to(dtype) for name, heads, d in
         (("q", 2 * groups, 4), ("k", 2, 4), ("v", 2, 8))}  # fmt: skip

    def form(name: str):
        return lambda **y: solve(
            LinearProblem(**y, normalize=True, feature_map="taylor"), form=name
        )

    problem = LinearProblem(**x, normalize=True, feature_map="taylor")
    assert chunked._kernel(problem, "recurrent") is not None
    check_function(form("recurrent"), form("reference"), x, grads=False).assert_ok()
