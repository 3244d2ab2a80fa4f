"""attnkit.attention's contract: errors that name the problem and the fix, explain, masked rows."""

from __future__ import annotations

import re

import pytest
import torch

import attnkit
from attnkit import calibration, masks, positional, scores
from attnkit.backends import BACKENDS
from attnkit.costs import CostTable
from attnkit.machine import Capabilities
from attnkit.testing import CASES


def qkv(B=2, Tq=9, Tk=11, Hq=8, Hkv=2, D=16, Dv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Tq, Hq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, Dv or D, generator=g, dtype=dtype)
    return q, k, v


# -- shape, dtype and device errors -----------------------------------------------------


def test_wrong_rank_says_layout_and_fix() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must be \[B, T, H, D\] \(4-D\), got a 3-D tensor"):
        attnkit.attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"unsqueeze"):
        attnkit.attention(q[0], k, v)


def test_heads_not_a_multiple() -> None:
    q, k, v = qkv(Hq=8, Hkv=3)
    with pytest.raises(ValueError, match="k has 3 heads, q has 8: Hq must be a multiple of Hkv"):
        attnkit.attention(q, k, v)


def test_batch_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch sizes differ: q has B=1, k B=2, v B=2"):
        attnkit.attention(q[:1], k, v)


def test_dtype_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"dtypes differ.*cast them to one dtype"):
        attnkit.attention(q, k.double(), v)


def test_device_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"different devices.*cpu.*meta.*move them to one"):
        attnkit.attention(q, k.to("meta"), v)


def test_head_dim_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q has head dim D=16 but k has 8.*\(v may differ\)"):
        attnkit.attention(q, k[..., :8], v)


def test_value_head_dim_may_differ() -> None:
    q, k, v = qkv(Dv=5)
    assert attnkit.attention(q, k, v).shape == (2, 9, 8, 5)


def test_k_v_length_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k has Tk=11 tokens but v has 10; they must match"):
        attnkit.attention(q, k, v[:, :10])


def test_k_v_heads_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k has 2 heads but v has 1"):
        attnkit.attention(q, k, v[:, :, :1])


def test_integer_dtype() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q has dtype torch.int64; use float16, bfloat16"):
        attnkit.attention(q.long(), k.long(), v.long())


def test_not_a_tensor() -> None:
    _, k, v = qkv()
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor, got list"):
        attnkit.attention([[1.0]], k, v)


def test_empty_input() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="empty input"):
        attnkit.attention(q[:, :0], k, v)


def test_mask_built_for_other_lengths() -> None:
    q, k, v = qkv(Tq=11)
    mask = masks.documents(torch.zeros(1, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="built for Tq=12, Tk=12 but this call has Tq=11, Tk=11"):
        attnkit.attention(q, k, v, mask=mask)


# -- backend selection errors ---------------------------------------------------------------


def test_unknown_backend_lists_the_backends() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown backend 'flash'; choose one of: auto, ") as err:
        attnkit.attention(q, k, v, backend="flash")
    assert all(name in str(err.value) for name in BACKENDS)


def test_forced_backend_that_cannot_run_says_why_and_who_can() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError) as err:
        attnkit.attention(q, k, v, score=scores.sigmoid(), backend="sdpa")
    message = str(err.value)
    assert "backend 'sdpa' cannot run this call" in message
    assert "sdpa computes only softmax attention (this call uses sigmoid)" in message
    able = message.split("Backends that can: ")[1]
    assert "reference" in able and "sdpa" not in able


def test_non_mask_object() -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"mask must be an attnkit mask.*got Tensor.*attnkit.masks"):
        attnkit.attention(q, k, v, mask=torch.ones(9, 11, dtype=torch.bool))


def test_non_score_object() -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"score must be an attnkit score function.*got str"):
        attnkit.attention(q, k, v, score="sigmoid")


def test_non_bias_object() -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"bias must be an attnkit bias.*got Tensor"):
        attnkit.attention(q, k, v, bias=torch.zeros(8, 9, 11))


# -- explain -----------------------------------------------------------------------------


_AVX512 = Capabilities(
    "cpu", "an AVX-512 CPU", "AVX512", frozenset({"avx2", "fma", "avx512f", "avx512bw"})
)


def _table(chunked: float, blocksparse: float) -> CostTable:
    """A synthetic table (``tests/test_dispatch.py``'s kind): chunked and blocksparse compute a
    tile at these multiples of SDPA's cost, with no fixed cost per call."""
    entries = {
        ("chunked.per_live", "*", None): chunked,
        ("chunked.dense", "*", None): chunked,
        ("blocksparse.per_live", "*", None): blocksparse,
        ("chunked.overhead_pairs", "*", None): 0.0,
        ("blocksparse.overhead_pairs", "*", None): 0.0,
        ("flex.overhead_pairs", "*", None): 0.0,
    }
    return CostTable(_AVX512, "synthetic", entries)


#: Three tables that rank the same calls differently.
EXPLAIN_TABLES = {
    "chunked_fast": _table(chunked=0.01, blocksparse=50.0),
    "blocksparse_fast": _table(chunked=50.0, blocksparse=0.01),
    "both_slow": _table(chunked=50.0, blocksparse=70.0),
}

#: options, {table: the backend auto must choose}, {backend: what its refusal must say}. Flex
#: is no candidate at these sizes (it compiles per shape); sigmoid leaves SDPA out, ReLU weights
#: leave chunked alone against the reference; an lse or soft cap leaves SDPA out, an lse Flex
#: too.
EXPLAIN_CASES = {
    "plain": (
        {},
        {"chunked_fast": "chunked", "blocksparse_fast": "blocksparse", "both_slow": "sdpa"},
        {},
    ),
    "causal": (
        {"mask": masks.causal()},
        {"chunked_fast": "chunked", "blocksparse_fast": "blocksparse", "both_slow": "sdpa"},
        {},
    ),
    "window_sigmoid": (
        {"mask": masks.sliding_window(3), "score": scores.sigmoid()},
        # both slow: chunked's score factor (2.0) outweighs blocksparse's (1.2)
        {"chunked_fast": "chunked", "blocksparse_fast": "blocksparse", "both_slow": "blocksparse"},
        {"sdpa": "only softmax"},
    ),
    "window_relu": (
        {"mask": masks.sliding_window(3), "score": scores.relu()},
        dict.fromkeys(EXPLAIN_TABLES, "chunked"),
        {"sdpa": "only softmax", "blocksparse": "softmax, sigmoid, softplus-l1 and Cog only"},
    ),
    "lse": (
        {"aux": attnkit.Aux(lse=True)},
        {"chunked_fast": "chunked", "blocksparse_fast": "blocksparse", "both_slow": "chunked"},
        {"sdpa": "log-sum-exp", "flex": "log-sum-exp"},
    ),
    "softcap": (
        {"score": scores.softcap(5.0)},
        {"chunked_fast": "chunked", "blocksparse_fast": "blocksparse", "both_slow": "chunked"},
        {"sdpa": "soft-capping"},
    ),
}

_ESTIMATE = re.compile(r"estimated (\d+\.\d+)x the time of dense SDPA: \w")


@pytest.mark.parametrize("table", EXPLAIN_TABLES)
@pytest.mark.parametrize("case", EXPLAIN_CASES)
def test_explain_names_the_choice_and_a_reason_for_every_other_backend(
    case: str, table: str
) -> None:
    """With injected costs, auto's choice is known: explain names it with its estimate, every
    candidate ranked after it with a larger estimate, and every refusal with its cause."""
    options, expected, refusals = EXPLAIN_CASES[case]
    q, k, v = qkv()
    with calibration.using(EXPLAIN_TABLES[table]):
        explanation = attnkit.explain(q, k, v, **options)
    chosen = expected[table]
    assert explanation.chosen == chosen
    estimate = _ESTIMATE.match(explanation.why)
    assert estimate, explanation.why
    assert set(explanation.rejected) == set(BACKENDS) - {chosen}
    for name, reason in explanation.rejected.items():
        if name in refusals:
            assert refusals[name] in reason, (name, reason)
        elif name == "reference":
            assert reason == f"ranked after {chosen}: only the dense reference can run this call"
        elif name == "flex":
            assert reason.startswith("not a candidate here: compiles once per shape"), reason
        else:  # a candidate auto estimated slower
            assert reason.startswith(f"ranked after {chosen}: "), (name, reason)
            later = _ESTIMATE.search(reason)
            assert later and float(later[1]) > float(estimate[1]), (name, reason)
    text = str(explanation)
    assert text.startswith(f"runs on: {chosen} — {explanation.why}")
    assert all(f"not {name}: {reason}" in text for name, reason in explanation.rejected.items())


def test_explain_a_forced_backend_lists_the_refusals() -> None:
    q, k, v = qkv()
    explanation = attnkit.explain(q, k, v, score=scores.softcap(5.0), backend="reference")
    assert explanation.chosen == "reference"
    assert explanation.why == "requested by the caller"
    assert "soft-capping" in explanation.rejected["sdpa"]


def test_explain_matches_what_attention_runs(backend_context) -> None:
    """A forced backend named by explain's choice runs the call without raising."""
    q, k, v = qkv()
    explanation = attnkit.explain(q, k, v, mask=masks.causal(), score=scores.sigmoid())
    assert "sdpa" in explanation.rejected and "softmax" in explanation.rejected["sdpa"]
    with backend_context(explanation.chosen):
        out = attnkit.attention(
            q, k, v, mask=masks.causal(), score=scores.sigmoid(), backend=explanation.chosen
        )
    reference = attnkit.attention(
        q, k, v, mask=masks.causal(), score=scores.sigmoid(), backend="reference"
    )
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


# -- fully masked rows: zeros, never NaN ------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize(
    "bias", [None, positional.alibi(4), "relative"], ids=["no_bias", "alibi", "relative"]
)
@pytest.mark.parametrize(
    "mask",
    [
        masks.key_padding(torch.tensor([65, 0])),
        masks.causal() & masks.key_padding(torch.tensor([65, 0])),
        masks.sliding_window(3) & ~masks.sliding_window(3),
    ],
    ids=["padding", "causal_padding", "nothing_visible"],
)
def test_fully_masked_rows_are_zero_with_finite_gradients(backend: str, bias, mask) -> None:
    q, k, v = CASES["cross_17x65_b2"].make(torch.float32)
    if bias == "relative":
        bias = positional.relative_bias(4, 8, generator=torch.Generator().manual_seed(0))
    out = attnkit.attention(q, k, v, mask=mask, bias=bias, backend=backend)
    assert not out.isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def test_query_before_first_key_sees_nothing() -> None:
    """Tq > Tk with bottom-right causal alignment: the first Tq - Tk queries see no key."""
    q, k, v = qkv(Tq=11, Tk=4)
    for backend in ("reference", "sdpa"):
        out = attnkit.attention(q, k, v, mask=masks.causal(), backend=backend)
        assert torch.equal(out[:, :7], torch.zeros_like(out[:, :7]))
        assert (out[:, 7:] != 0).any()
