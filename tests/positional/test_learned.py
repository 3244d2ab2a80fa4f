"""Learned relative biases: Shaw-style clipped offsets and T5's buckets; gradients of the tables
through every backend."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import attnkit
from attnkit import masks, positional
from attnkit.testing import CASES, check_against_reference


def test_relative_bias_clips_offsets_at_max_distance() -> None:
    H, max_distance, Tq, Tk = 3, 4, 6, 15
    table = torch.arange(H * (2 * max_distance + 1), dtype=torch.float32).view(H, -1)
    bias = positional.relative_bias(H, max_distance, table=table).dense(Tq, Tk)
    for i in range(Tq):
        position = i + (Tk - Tq)
        for j in range(Tk):
            offset = max(-max_distance, min(max_distance, j - position))
            assert torch.equal(bias[:, i, j], table[:, offset + max_distance])
    # far keys on both sides share the end entries
    assert torch.equal(bias[:, 0, 0], table[:, 0])
    assert torch.equal(bias[:, 0, -1], table[:, -1])


def test_relative_bias_has_a_gradient(formula) -> None:
    """Gradient of the table through attention equals autograd through the written-out gather."""
    q, k, v = CASES["gqa_8_2"].make(torch.float64, requires_grad=False)
    max_distance = 5
    g = torch.Generator().manual_seed(1)
    bias = positional.relative_bias(8, max_distance, generator=g)
    table = bias.table
    assert table.requires_grad and bias.parameters() == [table]
    table64 = table.detach().double().requires_grad_(True)
    bias64 = positional.relative_bias(8, max_distance, table=table64)
    out = attnkit.attention(q, k, v, bias=bias64, mask=masks.causal(), backend="reference")
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, table64, dout)

    # The same bias gathered by hand, differentiated by autograd.
    table_by_hand = table.detach().double().requires_grad_(True)
    offsets = (torch.arange(48).view(1, -1) - torch.arange(48).view(-1, 1)).clamp(-5, 5) + 5
    dense_bias = table_by_hand[:, offsets]
    allowed = torch.ones(48, 48, dtype=torch.bool).tril()
    scores = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(4, dim=2)) / math.sqrt(32)
    weights = torch.softmax((scores + dense_bias).masked_fill(~allowed, float("-inf")), dim=-1)
    by_hand = torch.einsum("bhij,bjhd->bihd", weights, v.repeat_interleave(4, dim=2))
    torch.testing.assert_close(out, by_hand)
    (expected,) = torch.autograd.grad(by_hand, table_by_hand, dout)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected)
    # offsets beyond ±5 exist in a 48-token causal window, so the end entries get gradient too
    assert (grad[:, 0] != 0).all()


def test_relative_bias_gradient_passes_the_kit() -> None:
    q, k, v = CASES["mqa_b2"].make(torch.float32)
    bias = positional.relative_bias(4, 6, generator=torch.Generator().manual_seed(3))
    report = check_against_reference(
        attnkit.attention, q, k, v, bias=bias, mask=masks.causal(), backend="reference"
    )
    report.assert_ok()
    assert [c.name for c in report.comparisons][-1] == "drelative_bias[0]"


def test_relative_bias_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match=r"\[H, 2\*max_distance\+1\] = \[H, 9\]"):
        positional.relative_bias(2, 4, table=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="table has 3 heads, expected 2"):
        positional.relative_bias(2, 4, table=torch.zeros(3, 9))


# -- T5 buckets ------------------------------------------------------------------------------

T5_SIZES = [(32, 128), (16, 64), (8, 20), (6, 9)]


def brute_force_bucket(relative: int, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of one offset ``key - query``, written from the paper's description one
    integer at a time: each direction (or only the past, for causal attention) gets its share of
    buckets; half of a share holds single distances, the other half is log-spaced up to
    ``max_distance``; the log step is evaluated in float32 and truncated, as T5's code does."""
    share = num_buckets // 2 if bidirectional else num_buckets
    base = share if (bidirectional and relative > 0) else 0
    distance = abs(relative) if bidirectional else max(0, -relative)
    exact = share // 2
    if distance < exact:
        return base + distance
    ratio = torch.log(torch.tensor(float(distance)) / exact) / math.log(max_distance / exact)
    step = int(ratio * (share - exact))
    return base + min(exact + step, share - 1)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize(("num_buckets", "max_distance"), T5_SIZES)
def test_t5_buckets_match_brute_force(bidirectional, num_buckets, max_distance) -> None:
    offsets = torch.arange(-3 * max_distance, 3 * max_distance + 1)
    got = positional.t5_relative_bucket(offsets, bidirectional, num_buckets, max_distance)
    expected = [
        brute_force_bucket(int(r), bidirectional, num_buckets, max_distance) for r in offsets
    ]
    assert got.dtype == torch.long
    assert got.tolist() == expected


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize(("num_buckets", "max_distance"), T5_SIZES)
def test_t5_buckets_match_transformers(bidirectional, num_buckets, max_distance) -> None:
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    offsets = torch.arange(-3 * max_distance, 3 * max_distance).view(6, -1)  # 2-D too
    got = positional.t5_relative_bucket(offsets, bidirectional, num_buckets, max_distance)
    expected = t5.T5Attention._relative_position_bucket(
        offsets, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(got, expected)


def test_t5_bucket_landmarks_with_t5_defaults() -> None:
    def bucket(r: int, bidirectional: bool) -> int:
        return int(positional.t5_relative_bucket(torch.tensor(r), bidirectional, 32, 128))

    # bidirectional: 16 buckets per direction, keys after the query in 16..31
    assert [bucket(r, True) for r in (0, -1, -7, 1, 7)] == [0, 1, 7, 17, 23]
    assert bucket(-8, True) == 8  # first log-spaced bucket
    # the last bucket starts where 8 * log(d / 8) / log(16) reaches 7: d = 8 * 2^3.5 = 90.5
    assert bucket(-90, True) == 14
    assert bucket(-91, True) == bucket(-128, True) == bucket(-10_000, True) == 15
    assert bucket(10_000, True) == 31
    # causal: all 32 buckets for the past, every later key shares bucket 0
    assert [bucket(r, False) for r in (3, 0, -15, -16)] == [0, 0, 15, 16]
    assert bucket(-10_000, False) == 31


def test_t5_bias_reads_the_table_by_bucket_bottom_right() -> None:
    H, buckets, max_distance, Tq, Tk = 3, 8, 12, 5, 40
    table = torch.randn(buckets, H)
    for bidirectional in (True, False):
        bias = positional.t5_bias(H, buckets, max_distance, bidirectional, table=table).dense(
            Tq, Tk
        )
        position = torch.arange(Tq).view(-1, 1) + (Tk - Tq)
        relative = torch.arange(Tk).view(1, -1) - position
        ids = positional.t5_relative_bucket(relative, bidirectional, buckets, max_distance)
        assert torch.equal(bias, table[ids].permute(2, 0, 1))


@pytest.mark.parametrize(
    ("backend", "bidirectional", "case", "dtype"),
    [
        ("reference", False, "cross_17x65_b2", torch.float32),
        ("sdpa", True, "gqa_8_2", torch.float32),
        ("chunked", False, "self_odd_63", torch.float32),
        ("chunked", True, "mqa_b2", torch.bfloat16),
    ],
)
def test_t5_bias_gradients_through_attention(backend, bidirectional, case, dtype) -> None:
    q, k, v = CASES[case].make(dtype)
    H = q.shape[2]
    bias = positional.t5_bias(H, 16, 24, bidirectional, generator=torch.Generator().manual_seed(0))
    bias.table.data.mul_(20)  # visible in the softmax, so the gradient check means something
    mask = masks.causal() if not bidirectional else None
    fn = partial(attnkit.attention, backend=backend)
    report = check_against_reference(fn, q, k, v, bias=bias, mask=mask)
    report.assert_ok()
    assert report.comparisons[-1].name == "dt5_bias[0]"


def test_t5_bias_runs_in_flex(backend_context) -> None:
    q, k, v = CASES["cross_17x65_b2"].make(requires_grad=False)
    bias = positional.t5_bias(4, 8, 30, False, table=torch.randn(8, 4))
    with backend_context("flex"):
        check_against_reference(
            partial(attnkit.attention, backend="flex"),
            q,
            k,
            v,
            grads=False,
            bias=bias,
            mask=masks.causal(),
        ).assert_ok()


def test_t5_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match=r"num_buckets >= 4 \(bidirectional\), got 3"):
        positional.t5_relative_bucket(torch.arange(3), True, 3, 10)
    with pytest.raises(ValueError, match="max_distance \\(4\\) must exceed the 4 exactly"):
        positional.t5_bias(2, 16, 4)
    with pytest.raises(ValueError, match=r"\[num_buckets, H\] = \[16, 2\], got \(2, 16\)"):
        positional.t5_bias(2, 16, 64, table=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="t5_bias bias has 2 heads but q has 4 heads"):
        q = torch.randn(1, 5, 4, 8)
        attnkit.attention(q, q, q, bias=positional.t5_bias(2))
