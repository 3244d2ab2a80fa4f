"""Public correctness kit: test any attention implementation the way attnkit tests its own.

The tolerance rule (FlashAttention's): compute a golden result in float64; the implementation's
error against it must be at most ``2 ×`` the error of the dense reference run in the *same*
dtype as the implementation, plus a small floor — for the output and for every gradient
(q, k, v and learnable bias parameters).

    from attnkit import testing, masks
    case = testing.CASES["gqa_8_2"]
    q, k, v = case.make(torch.bfloat16)
    report = testing.check_against_reference(my_attention, q, k, v, mask=masks.causal())
    report.assert_ok()

``my_attention`` takes ``attnkit.attention``'s signature (``q, k, v, **options``) and returns
``[B, Tq, Hq, Dv]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit import _alloc
from attnkit.backends.reference import reference_forward
from attnkit.call import AttentionCall
from attnkit.masks.base import Mask, aligned_query_positions
from attnkit.positional import Bias
from attnkit.scores import ScoreFunction, Softmax

#: Error floor added to the 2× bound, per dtype, in units of the checked tensor's largest
#: magnitude (at least 1): gradients reach O(10), where float32 accumulation-order noise alone
#: exceeds an absolute 2e-6 (measured: SDPA's GQA dk, 6.9e-6 at |dk| = 7.3, reference 2.3e-6).
FLOORS: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-4,
    torch.bfloat16: 2e-3,
}


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | None = None,
    score: ScoreFunction | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """The dense reference, optionally computed in ``compute_dtype`` (e.g. bfloat16 to get
    the same-precision baseline of the 2× rule). Returns ``[B, Tq, Hq, Dv]``."""
    call = AttentionCall(q, k, v, mask, score or Softmax(), bias, scale)
    out, lse = reference_forward(call, compute_dtype)
    return call.finalize(out, lse)


@dataclass(frozen=True)
class Case:
    """A labelled input shape. ``make`` draws q, k, v (seeded) in a dtype."""

    label: str
    B: int
    Tq: int
    Tk: int
    Hq: int
    Hkv: int
    D: int
    Dv: int | None = None

    def make(
        self,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        requires_grad: bool = True,
        asymmetric: bool = True,
        device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``q [B, Tq, Hq, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]``.

        ``asymmetric`` shifts the distributions (non-zero means, per-head scales) so that sign
        and layout errors cannot hide behind symmetric ``randn`` inputs.
        """
        g = torch.Generator().manual_seed(seed)
        Dv = self.Dv or self.D

        def draw(*shape: int, shift: float) -> Tensor:
            x = torch.randn(*shape, generator=g, dtype=torch.float64)
            if asymmetric:
                head_scale = torch.linspace(0.5, 1.5, shape[2], dtype=torch.float64).view(
                    1, 1, -1, 1
                )
                x = x * head_scale + shift
            return x.to(dtype).to(device).requires_grad_(requires_grad)

        q = draw(self.B, self.Tq, self.Hq, self.D, shift=0.3)
        k = draw(self.B, self.Tk, self.Hkv, self.D, shift=-0.2)
        v = draw(self.B, self.Tk, self.Hkv, Dv, shift=0.5)
        return q, k, v


#: Curated cases: odd lengths, Tq != Tk, GQA 8:2, MQA, odd head dims, batch > 1, decoding.
CASES: dict[str, Case] = {
    c.label: c
    for c in (
        Case("self_odd_63", B=1, Tq=63, Tk=63, Hq=4, Hkv=4, D=32),
        Case("cross_17x65_b2", B=2, Tq=17, Tk=65, Hq=4, Hkv=4, D=32),
        Case("gqa_8_2", B=1, Tq=48, Tk=48, Hq=8, Hkv=2, D=32),
        Case("mqa_b2", B=2, Tq=33, Tk=33, Hq=4, Hkv=1, D=16),
        Case("odd_head_dim_33", B=1, Tq=40, Tk=40, Hq=2, Hkv=2, D=33),
        Case("value_dim_48", B=1, Tq=37, Tk=37, Hq=2, Hkv=1, D=32, Dv=48),
        Case("decode_1x70", B=2, Tq=1, Tk=70, Hq=4, Hkv=2, D=32),
        Case("long_1025", B=1, Tq=1025, Tk=1025, Hq=2, Hkv=1, D=32),
    )
}

#: CAB's four patterns (causal / non-causal × self / cross): (label, case, causal).
CAB_PATTERNS: tuple[tuple[str, Case, bool], ...] = (
    ("causal_self", Case("cab_self", B=2, Tq=45, Tk=45, Hq=4, Hkv=2, D=32), True),
    ("noncausal_self", Case("cab_self", B=2, Tq=45, Tk=45, Hq=4, Hkv=2, D=32), False),
    ("causal_cross", Case("cab_cross", B=2, Tq=21, Tk=50, Hq=4, Hkv=2, D=32), True),
    ("noncausal_cross", Case("cab_cross", B=2, Tq=21, Tk=50, Hq=4, Hkv=2, D=32), False),
)


@dataclass(frozen=True)
class Comparison:
    """One checked tensor: its error against the golden, the reference's, and the bound."""

    name: str
    error: float
    reference_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # NaN fails


@dataclass
class CheckReport:
    """Result of ``check_against_reference``; ``assert_ok`` raises with a readable table."""

    dtype: torch.dtype
    comparisons: list[Comparison]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    def __str__(self) -> str:
        rows = [f"{'tensor':<14}{'error':>12}{'ref error':>12}{'bound':>12}  ok  ({self.dtype})"]
        for c in self.comparisons:
            rows.append(
                f"{c.name:<14}{c.error:>12.3e}{c.reference_error:>12.3e}{c.bound:>12.3e}  "
                f"{'yes' if c.ok else 'NO'}"
            )
        return "\n".join(rows)

    def assert_ok(self) -> None:
        if not self.ok:
            raise AssertionError(
                "attention differs from the reference beyond 2x its error:\n" + str(self)
            )


def _max_err(x: Tensor, golden: Tensor) -> float:
    return (x.double() - golden.double()).abs().max().item() if x.numel() else 0.0


def check_against_reference(
    fn: Callable[..., Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    grads: bool = True,
    floor: float | None = None,
    seed: int = 0,
    **options,
) -> CheckReport:
    """Compare ``fn(q, k, v, **options)`` with the float64 golden under the 2× rule.

    ``options`` are ``attnkit.attention`` keyword arguments (mask, score, bias, scale); they
    define the golden and the same-dtype reference. With ``grads``, the gradients of a fixed
    random upstream gradient w.r.t. q, k, v and any learnable bias parameters are checked too.
    ``floor`` overrides ``FLOORS[q.dtype]`` (scaled by each tensor's largest magnitude, >= 1).
    """
    reference_options = {
        key: options[key] for key in ("mask", "score", "bias", "scale") if key in options
    }
    bias = options.get("bias")
    params = bias.parameters() if isinstance(bias, Bias) else []
    dtype = q.dtype
    floor = FLOORS[dtype] if floor is None else floor

    def leaves(t: Tensor, as_dtype: torch.dtype) -> Tensor:
        return t.detach().to(as_dtype).requires_grad_(grads)

    def run(f: Callable[..., Tensor], as_dtype: torch.dtype, **extra) -> list[Tensor]:
        qq, kk, vv = leaves(q, as_dtype), leaves(k, as_dtype), leaves(v, as_dtype)
        out = f(qq, kk, vv, **extra)
        if not grads:
            return [out.detach()]
        g = torch.Generator().manual_seed(seed)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        inputs = [qq, kk, vv, *params]
        got = torch.autograd.grad(out, inputs, dout, allow_unused=True)
        return [out.detach()] + [
            torch.zeros_like(i) if gi is None else gi for gi, i in zip(got, inputs, strict=True)
        ]

    # The golden reads bias parameters through a float64 cast, so their gradients (sums over
    # every (q, k) pair) accumulate in float64 too; the parameters themselves are unchanged.
    golden_options = dict(reference_options)
    if isinstance(bias, Bias):
        golden_options["bias"] = bias.to(torch.float64)
    golden = run(reference_attention, torch.float64, **golden_options, compute_dtype=torch.float64)
    baseline = run(reference_attention, dtype, **reference_options, compute_dtype=dtype)
    with nan_filled_outputs():
        tested = run(fn, dtype, **options)
    names = ["out", "dq", "dk", "dv"] + [
        f"d{getattr(bias, 'name', 'bias')}[{i}]" for i in range(len(params))
    ]
    # A parameter's gradient is no more precise than the parameter: a float32 bias table in a
    # float64 call gets the float32 floor.
    floors = [floor] * 4 + [max(floor, FLOORS.get(p.dtype, floor)) for p in params]
    return _compare(dtype, names, tested, baseline, golden, floors)


def _compare(
    dtype: torch.dtype,
    names: list[str],
    tested: list[Tensor],
    baseline: list[Tensor],
    golden: list[Tensor],
    floors: list[float],
) -> CheckReport:
    comparisons = []
    for name, t, b, gold, f in zip(names, tested, baseline, golden, floors, strict=False):
        ref_err = _max_err(b, gold)
        magnitude = max(1.0, gold.abs().max().item()) if gold.numel() else 1.0
        bound = 2 * ref_err + f * magnitude
        comparisons.append(Comparison(name, _max_err(t, gold), ref_err, bound))
    return CheckReport(dtype, comparisons)


def check_function(
    fn: Callable[..., Tensor],
    reference: Callable[..., Tensor],
    inputs: dict[str, Tensor],
    *,
    grads: bool = True,
    floor: float | None = None,
    seed: int = 0,
) -> CheckReport:
    """Compare ``fn(**inputs)`` with ``reference(**inputs)`` under the 2× rule.

    The general form of ``check_against_reference`` for anything that is not a plain attention
    call (a positional scheme, a head layout, a whole layer): pass every tensor that matters,
    weights included, in ``inputs`` (for an ``nn.Module`` use ``torch.func.functional_call``
    with its parameters as inputs). The golden is ``reference`` on float64 copies of the
    floating-point inputs; the baseline is ``reference`` in the inputs' own dtypes. With
    ``grads``, gradients of a fixed random upstream gradient w.r.t. every floating-point
    input are checked too. The floor is that of the first floating-point input's dtype.
    """
    floating = [name for name, t in inputs.items() if t.is_floating_point()]
    if not floating:
        raise ValueError("check_function needs at least one floating-point input")
    dtype = inputs[floating[0]].dtype
    floor = FLOORS[dtype] if floor is None else floor

    def run(f: Callable[..., Tensor], to64: bool) -> list[Tensor]:
        leaves = {
            name: (t.detach().double() if to64 else t.detach()).requires_grad_(grads)
            if name in floating
            else t
            for name, t in inputs.items()
        }
        out = f(**leaves)
        if not grads:
            return [out.detach()]
        g = torch.Generator().manual_seed(seed)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        wrt = [leaves[name] for name in floating]
        got = torch.autograd.grad(out, wrt, dout, allow_unused=True)
        return [out.detach()] + [
            torch.zeros_like(i) if gi is None else gi for gi, i in zip(got, wrt, strict=True)
        ]

    golden = run(reference, True)
    baseline = run(reference, False)
    with nan_filled_outputs():
        tested = run(fn, False)
    names = ["out"] + ([f"d{name}" for name in floating] if grads else [])
    floors = [floor] + [max(floor, FLOORS.get(inputs[n].dtype, floor)) for n in floating]
    return _compare(dtype, names, tested, baseline, golden, floors)


@contextlib.contextmanager
def nan_filled_outputs() -> Iterator[None]:
    """Within this block, buffers that attnkit kernels allocate start as NaN, so a kernel that
    leaves part of its output unwritten fails loudly instead of returning stale memory."""
    previous = _alloc.FILL_NAN
    _alloc.FILL_NAN = True
    try:
        yield
    finally:
        _alloc.FILL_NAN = previous


def check_causality(
    fn: Callable[..., Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cut: int,
    **options,
) -> None:
    """Assert that changing keys/values at positions ``>= cut`` leaves every query whose
    (bottom-right aligned) position is ``< cut`` unchanged — for a causal ``options['mask']``."""
    Tq, Tk = q.shape[1], k.shape[1]
    with torch.no_grad():
        before = fn(q, k, v, **options)
        k2, v2 = k.detach().clone(), v.detach().clone()
        k2[:, cut:] = torch.randn_like(k2[:, cut:]) * 3 + 1
        v2[:, cut:] = torch.randn_like(v2[:, cut:]) * 3 - 1
        after = fn(q, k2, v2, **options)
    positions = aligned_query_positions(torch.arange(Tq), Tq, Tk)
    past = positions < cut
    if not past.any():
        raise ValueError(f"no query lies before cut={cut}; choose a larger cut")
    if not torch.equal(before[:, past], after[:, past]):
        diff = (before[:, past] - after[:, past]).abs().max().item()
        raise AssertionError(
            f"outputs of queries before position {cut} changed by {diff:.3e} "
            "when only later keys changed: the implementation leaks the future"
        )
