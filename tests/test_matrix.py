"""The backend matrix: every backend in the table against the reference, on a curated list.

Each entry pairs a mask with a score function, a bias, an input case and a dtype. The list is
not a Cartesian product: it covers every mask with every score once, each bias, each of
``CASES`` and the four ``CAB_PATTERNS``
(``test_the_matrix_covers_every_mask_score_bias_and_case`` checks that), plus a bfloat16
subset and float64. Backends are read from ``attnkit.backends.BACKENDS``,
so a new backend is tested as soon as it is registered.

For each backend and entry: if ``supports(call)`` accepts the call (with gradients when the
inputs require them) the backend must pass ``check_against_reference``; if it refuses a call
that needs gradients, the forward alone is checked under ``torch.no_grad``; a refusal must be
a sentence, and forcing the backend must raise with it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch

import attnkit
from attnkit import masks, positional, scores
from attnkit.backends import BACKENDS, Backend
from attnkit.backends.reference import reference_forward
from attnkit.call import AttentionCall
from attnkit.masks import Mask
from attnkit.positional import Bias
from attnkit.testing import CAB_PATTERNS, CASES, Case, check_against_reference


def document_ids(case: Case) -> torch.Tensor:
    """Uneven packed documents ``[B, Tk]``, a different packing per batch row."""
    rows = []
    for b in range(case.B):
        lengths = torch.tensor([3 + 4 * b, 9, 1, 13, case.Tk])
        ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        rows.append(ids[: case.Tk])
    return torch.stack(rows)


def per_batch(case: Case, *lengths: int) -> torch.Tensor:
    return torch.tensor([min(max(n, 0), case.Tk) for n in lengths][: case.B])


MASKS: dict[str, Callable[[Case], Mask | None]] = {
    "none": lambda c: None,
    "causal": lambda c: masks.causal(),
    "window_7": lambda c: masks.sliding_window(7),
    "window_5_3": lambda c: masks.sliding_window(5, 3),
    "sinks_window": lambda c: masks.sinks(3) | masks.sliding_window(6),
    "prefix_lm": lambda c: masks.prefix_lm(per_batch(c, 5, c.Tk // 2)),
    "documents": lambda c: masks.documents(
        document_ids(c)[:, c.Tk - c.Tq :], kv_segment_ids=document_ids(c)
    ),
    "padding_right": lambda c: masks.key_padding(per_batch(c, c.Tk - 3, c.Tk // 3)),
    "padding_left": lambda c: masks.key_padding(per_batch(c, c.Tk // 2, c.Tk - 5), side="left"),
    # batch row 1 sees no key at all: zero output and zero gradients, never NaN
    "empty_row": lambda c: masks.causal() & masks.key_padding(per_batch(c, c.Tk // 2, 0)),
}

SCORES = {
    "softmax": scores.softmax(),
    "sigmoid": scores.sigmoid(),
    "softplus_l1": scores.softplus_l1(),
    "softcap": scores.softcap(5.0),
    "relu": scores.relu(),
}

BIASES: dict[str, Callable[[int], Bias | None]] = {
    "none": lambda H: None,
    "alibi": lambda H: positional.alibi(H),
    "relative": lambda H: positional.relative_bias(
        H, 8, generator=torch.Generator().manual_seed(H)
    ),
}


@dataclass(frozen=True)
class Entry:
    case: Case
    mask: str
    score: str
    bias: str
    dtype: torch.dtype = torch.float32
    slow: bool = False

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.mask}-{self.score}-{self.bias}-{self.case.label}-{dtype}"


F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
CAB = {label: case for label, case, _ in CAB_PATTERNS}

ENTRIES = [
    # every mask with every score; cases and biases rotate through the list
    Entry(CASES["self_odd_63"], "none", "softmax", "none"),
    Entry(CASES["cross_17x65_b2"], "none", "sigmoid", "alibi"),
    Entry(CASES["gqa_8_2"], "none", "softplus_l1", "relative"),
    Entry(CASES["mqa_b2"], "none", "softcap", "none"),
    Entry(CASES["odd_head_dim_33"], "causal", "softmax", "alibi"),
    Entry(CASES["value_dim_48"], "causal", "sigmoid", "relative"),
    Entry(CASES["decode_1x70"], "causal", "softplus_l1", "none"),
    Entry(CASES["self_odd_63"], "causal", "softcap", "alibi"),
    Entry(CASES["cross_17x65_b2"], "window_7", "softmax", "relative"),
    Entry(CASES["gqa_8_2"], "window_7", "sigmoid", "none"),
    Entry(CASES["mqa_b2"], "window_7", "softplus_l1", "alibi"),
    Entry(CASES["odd_head_dim_33"], "window_7", "softcap", "relative"),
    Entry(CASES["value_dim_48"], "window_5_3", "softmax", "none"),
    Entry(CASES["decode_1x70"], "window_5_3", "sigmoid", "alibi"),
    Entry(CASES["self_odd_63"], "window_5_3", "softplus_l1", "relative"),
    Entry(CASES["cross_17x65_b2"], "window_5_3", "softcap", "none"),
    Entry(CASES["gqa_8_2"], "sinks_window", "softmax", "alibi"),
    Entry(CASES["mqa_b2"], "sinks_window", "sigmoid", "relative"),
    Entry(CASES["odd_head_dim_33"], "sinks_window", "softplus_l1", "none"),
    Entry(CASES["value_dim_48"], "sinks_window", "softcap", "alibi"),
    Entry(CASES["decode_1x70"], "prefix_lm", "softmax", "relative"),
    Entry(CASES["self_odd_63"], "prefix_lm", "sigmoid", "none"),
    Entry(CASES["cross_17x65_b2"], "prefix_lm", "softplus_l1", "alibi"),
    Entry(CASES["gqa_8_2"], "prefix_lm", "softcap", "relative"),
    Entry(CASES["mqa_b2"], "documents", "softmax", "none"),
    Entry(CASES["odd_head_dim_33"], "documents", "sigmoid", "alibi"),
    Entry(CASES["value_dim_48"], "documents", "softplus_l1", "relative"),
    Entry(CASES["decode_1x70"], "documents", "softcap", "none"),
    Entry(CASES["self_odd_63"], "padding_right", "softmax", "alibi"),
    Entry(CASES["cross_17x65_b2"], "padding_right", "sigmoid", "relative"),
    Entry(CASES["gqa_8_2"], "padding_right", "softplus_l1", "none"),
    Entry(CASES["mqa_b2"], "padding_right", "softcap", "alibi"),
    Entry(CASES["odd_head_dim_33"], "padding_left", "softmax", "relative"),
    Entry(CASES["value_dim_48"], "padding_left", "sigmoid", "none"),
    Entry(CASES["decode_1x70"], "padding_left", "softplus_l1", "alibi"),
    Entry(CASES["self_odd_63"], "padding_left", "softcap", "relative"),
    Entry(CASES["value_dim_48"], "none", "relu", "alibi"),
    Entry(CASES["decode_1x70"], "causal", "relu", "relative"),
    Entry(CASES["self_odd_63"], "window_7", "relu", "none"),
    Entry(CASES["cross_17x65_b2"], "window_5_3", "relu", "alibi"),
    Entry(CASES["gqa_8_2"], "sinks_window", "relu", "relative"),
    Entry(CASES["mqa_b2"], "prefix_lm", "relu", "none"),
    Entry(CASES["odd_head_dim_33"], "documents", "relu", "alibi"),
    Entry(CASES["value_dim_48"], "padding_right", "relu", "relative"),
    Entry(CASES["decode_1x70"], "padding_left", "relu", "none"),
    # fully masked rows
    Entry(CASES["cross_17x65_b2"], "empty_row", "softmax", "alibi"),
    Entry(CASES["mqa_b2"], "empty_row", "sigmoid", "none"),
    Entry(CASES["decode_1x70"], "empty_row", "softplus_l1", "relative"),
    Entry(CAB["noncausal_self"], "empty_row", "softcap", "alibi"),
    Entry(CASES["gqa_8_2"], "empty_row", "relu", "none"),
    # CAB's four patterns
    Entry(CAB["causal_self"], "causal", "softmax", "none"),
    Entry(CAB["noncausal_self"], "window_5_3", "softplus_l1", "alibi"),
    Entry(CAB["causal_cross"], "causal", "sigmoid", "relative"),
    Entry(CAB["noncausal_cross"], "none", "softcap", "relative"),
    # bfloat16 subset
    Entry(CASES["gqa_8_2"], "causal", "softmax", "none", BF16),
    Entry(CASES["mqa_b2"], "sinks_window", "sigmoid", "alibi", BF16),
    Entry(CASES["cross_17x65_b2"], "documents", "softplus_l1", "none", BF16),
    Entry(CASES["value_dim_48"], "padding_left", "softcap", "relative", BF16),
    Entry(CASES["decode_1x70"], "window_7", "softmax", "alibi", BF16),
    Entry(CASES["self_odd_63"], "prefix_lm", "softmax", "relative", BF16),
    # float64
    Entry(CASES["gqa_8_2"], "causal", "sigmoid", "alibi", F64),
    Entry(CASES["cross_17x65_b2"], "documents", "softmax", "relative", F64),
    # long sequences (marked slow)
    Entry(CASES["long_1025"], "causal", "softmax", "none", slow=True),
    Entry(CASES["long_1025"], "sinks_window", "sigmoid", "alibi", slow=True),
    Entry(CASES["long_1025"], "documents", "softplus_l1", "relative", BF16, slow=True),
]


def build(entry: Entry, requires_grad: bool) -> tuple[tuple, dict]:
    q, k, v = entry.case.make(entry.dtype, requires_grad=requires_grad)
    options = {
        "mask": MASKS[entry.mask](entry.case),
        "score": SCORES[entry.score],
        "bias": BIASES[entry.bias](entry.case.Hq),
    }
    return (q, k, v), options


def assert_is_a_reason(reason: str) -> None:
    assert isinstance(reason, str) and len(reason.split()) >= 3, f"not a reason: {reason!r}"


def check_backend(name: str, entry: Entry, backend_context) -> None:
    backend = BACKENDS[name]
    fn = partial(attnkit.attention, backend=name)
    with backend_context(name):
        (q, k, v), options = build(entry, requires_grad=True)
        call = AttentionCall(q, k, v, **options)
        refusal = backend.supports(call)
        if refusal is None:
            check_against_reference(fn, q, k, v, grads=call.needs_grad, **options).assert_ok()
            return
        assert_is_a_reason(refusal)
        (q, k, v), options = build(entry, requires_grad=False)
        with torch.no_grad():  # a learned bias table requires grad, too
            forward_refusal = backend.supports(AttentionCall(q, k, v, **options))
            if forward_refusal is None:
                check_against_reference(fn, q, k, v, grads=False, **options).assert_ok()
                return
            assert_is_a_reason(forward_refusal)
            with pytest.raises(ValueError, match=re.escape(forward_refusal)):
                fn(q, k, v, **options)


PARAMS = [
    pytest.param(name, entry, id=f"{name}-{entry.label}", marks=[pytest.mark.slow] * entry.slow)
    for name in BACKENDS
    if name != "reference"  # the oracle itself: one sanity case below
    for entry in ENTRIES
]


@pytest.mark.parametrize(("name", "entry"), PARAMS)
def test_backend_matches_reference(name: str, entry: Entry, backend_context) -> None:
    check_backend(name, entry, backend_context)


def test_reference_sanity(backend_context) -> None:
    """The oracle against its own float64 golden, once (grads included)."""
    entry = next(e for e in ENTRIES if e.label == "sinks_window-softmax-alibi-gqa_8_2-float32")
    check_backend("reference", entry, backend_context)


def test_the_matrix_covers_every_mask_score_bias_and_case() -> None:
    pairs = {(e.mask, e.score) for e in ENTRIES}
    assert pairs >= {(m, s) for m in MASKS for s in SCORES}
    assert {e.bias for e in ENTRIES} == set(BIASES)
    assert {e.case.label for e in ENTRIES} >= set(CASES)
    cab_cases = {(e.case, e.mask) for e in ENTRIES}
    for _, case, causal in CAB_PATTERNS:
        assert any(c == case and (m == "causal") == causal for c, m in cab_cases)
    assert {e.dtype for e in ENTRIES} == {F32, BF16, F64}
    assert len({e.label for e in ENTRIES}) == len(ENTRIES), "labels must be unique"


def forgets_the_bias(call: AttentionCall):
    return reference_forward(dataclasses.replace(call, bias=None))


@pytest.mark.parametrize(
    ("supports", "message"),
    [(lambda call: None, "beyond 2x its error"), (lambda call: "", "not a reason")],
    ids=["wrong_numbers", "silent_refusal"],
)
def test_the_harness_fails_a_broken_backend(
    supports, message: str, monkeypatch: pytest.MonkeyPatch, backend_context
) -> None:
    broken = Backend("broken", "drops the bias", supports, forgets_the_bias)
    monkeypatch.setitem(BACKENDS, "broken", broken)
    entry = next(e for e in ENTRIES if e.bias == "alibi")
    with pytest.raises(AssertionError, match=message):
        check_backend("broken", entry, backend_context)
