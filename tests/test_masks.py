"""Masks: the analytic block structure, mask_mod and row counts all agree with the dense view."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
from torch import Tensor
from torch.nn.attention.flex_attention import create_mask

import attnkit
from attnkit import masks, testing
from attnkit.masks import EMPTY, FULL, PARTIAL, Mask

MaskFactory = Callable[[int, int], Mask]


def sorted_segments(T: int, lengths: list[int]) -> Tensor:
    """Segment ids ``[1, T]`` of documents with the given lengths (the last one fills up)."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    ids = torch.cat([ids, torch.full((max(T - ids.numel(), 0),), len(lengths))])
    return ids[:T].view(1, T)


def documents_for(Tq: int, Tk: int) -> Mask:
    """Packed documents of uneven lengths; queries are the last ``Tq`` tokens (decoding)."""
    kv = torch.cat([sorted_segments(Tk, [5, 11, 1, 9]), sorted_segments(Tk, [17, 2, 20])])
    return masks.documents(kv[:, Tk - Tq :], kv_segment_ids=kv)


def documents_from_cu_seqlens(Tq: int, Tk: int) -> Mask:
    assert Tq == Tk, "cu_seqlens describe self-attention"
    return masks.documents(cu_seqlens=torch.tensor([0, 6, 7, 19, Tk]))


def unsorted_documents(Tq: int, Tk: int) -> Mask:
    """Ids that repeat out of order (e.g. interleaved streams): only soundness is promised."""
    kv = ((torch.arange(Tk) // 3) % 4).view(1, Tk)
    return masks.documents(kv[:, Tk - Tq :], kv_segment_ids=kv)


# Primitive patterns: their analytic tile classification must be exact.
PRIMITIVES: dict[str, MaskFactory] = {
    "full": lambda Tq, Tk: masks.full(),
    "causal": lambda Tq, Tk: masks.causal(),
    "window_left_6": lambda Tq, Tk: masks.sliding_window(6),
    "window_left_4_right_3": lambda Tq, Tk: masks.sliding_window(4, 3),
    "window_0": lambda Tq, Tk: masks.sliding_window(0),
    "sinks_3": lambda Tq, Tk: masks.sinks(3),
    "key_padding_right": lambda Tq, Tk: masks.key_padding(torch.tensor([Tk, Tk // 2, 0])),
    "key_padding_left": lambda Tq, Tk: masks.key_padding(torch.tensor([3, Tk, 0]), side="left"),
    "documents_segment_ids": documents_for,
    "documents_cu_seqlens": documents_from_cu_seqlens,
    "keys_with_holes": lambda Tq, Tk: masks.keys(torch.arange(Tk).view(1, Tk) % 5 != 2),
    "keys_per_batch": lambda Tq, Tk: masks.keys(
        torch.stack([torch.arange(Tk) >= 9, torch.zeros(Tk, dtype=torch.bool)])
    ),
    "from_dense_random": lambda Tq, Tk: masks.from_dense(
        torch.rand(2, 3, Tq, Tk, generator=torch.Generator().manual_seed(Tq + Tk)) < 0.7
    ),
    "from_dense_causal_blocks": lambda Tq, Tk: masks.from_dense(masks.causal().dense(Tq, Tk)),
}

# Compositions: the tile classification must be sound (FULL => all true, EMPTY => all false).
COMPOSITIONS: dict[str, MaskFactory] = {
    "prefix_lm_int": lambda Tq, Tk: masks.prefix_lm(9),
    "prefix_lm_per_batch": lambda Tq, Tk: masks.prefix_lm(torch.tensor([0, 9, Tk])),
    "causal_and_window": lambda Tq, Tk: masks.causal() & masks.sliding_window(6, 6),
    "sinks_or_window": lambda Tq, Tk: masks.sinks(3) | masks.sliding_window(6),
    "not_causal": lambda Tq, Tk: ~masks.causal(),
    "documents_and_causal": lambda Tq, Tk: documents_for(Tq, Tk) & masks.causal(),
    "padding_and_not_window": lambda Tq, Tk: (
        masks.key_padding(torch.tensor([Tk - 4, 5])) & ~masks.sliding_window(2, 2)
    ),
    "unsorted_documents": unsorted_documents,
    "sinks_or_window_and_padding": lambda Tq, Tk: (
        (masks.sinks(2) | masks.sliding_window(4, 2)) & masks.key_padding(torch.tensor([Tk, 7]))
    ),
}

SIZES = {  # (Tq, Tk, block_q, block_k): odd sizes, Tq < Tk, tiles that do not divide T
    "self_37_b8x16": (37, 37, 8, 16),
    "self_37_b5x7": (37, 37, 5, 7),
    "cross_13x50_b8x16": (13, 50, 8, 16),
    "cross_13x50_b5x7": (13, 50, 5, 7),
    "decode_1x50_b4x4": (1, 50, 4, 4),
}
SELF_SIZES = [name for name, (Tq, Tk, *_) in SIZES.items() if Tq == Tk]


def brute_force_kinds(dense: Tensor, block_q: int, block_k: int) -> Tensor:
    """Tile kinds ``[Bm, Hm, nq, nk]`` from every pair of ``dense`` ``[Bm, Hm, Tq, Tk]``."""
    Bm, Hm, Tq, Tk = dense.shape
    nq, nk = -(-Tq // block_q), -(-Tk // block_k)
    kinds = torch.empty(Bm, Hm, nq, nk, dtype=torch.int8)
    for i in range(nq):
        for j in range(nk):
            tile = dense[:, :, i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
            all_true, any_true = tile.flatten(2).all(-1), tile.flatten(2).any(-1)
            kinds[:, :, i, j] = torch.where(all_true, FULL, torch.where(any_true, PARTIAL, EMPTY))
    return kinds


def mask_cases(factories: dict[str, MaskFactory]) -> list:
    cases = []
    for mask_name, factory in factories.items():
        for size_name, size in SIZES.items():
            if factory is documents_from_cu_seqlens and size[0] != size[1]:
                continue
            cases.append(pytest.param(factory, size, id=f"{mask_name}-{size_name}"))
    return cases


@pytest.mark.parametrize(("factory", "size"), mask_cases(PRIMITIVES))
def test_primitive_blocks_are_exact(factory: MaskFactory, size: tuple[int, int, int, int]) -> None:
    Tq, Tk, bq, bk = size
    mask = factory(Tq, Tk)
    structure = mask.blocks(Tq, Tk, bq, bk)
    expected = brute_force_kinds(mask.dense(Tq, Tk), bq, bk)
    assert structure.kinds.dtype == torch.int8
    assert structure.kinds.shape == expected.shape
    assert torch.equal(structure.kinds, expected)


@pytest.mark.parametrize(("factory", "size"), mask_cases(COMPOSITIONS))
def test_composed_blocks_are_sound(factory: MaskFactory, size: tuple[int, int, int, int]) -> None:
    Tq, Tk, bq, bk = size
    mask = factory(Tq, Tk)
    kinds = mask.blocks(Tq, Tk, bq, bk).kinds
    exact = brute_force_kinds(mask.dense(Tq, Tk), bq, bk)
    assert kinds.shape == exact.shape
    # A tile called FULL must be full and one called EMPTY must be empty; PARTIAL is always safe.
    assert torch.equal(exact[kinds == FULL], torch.full_like(exact[kinds == FULL], FULL))
    assert torch.equal(exact[kinds == EMPTY], torch.full_like(exact[kinds == EMPTY], EMPTY))


def test_compositions_classify_most_tiles_exactly() -> None:
    """Soundness alone would allow all-PARTIAL; the min/max rules must stay useful."""
    mask = masks.causal() & masks.sliding_window(16)
    kinds = mask.blocks(256, 256, 16, 16).kinds
    assert torch.equal(kinds, brute_force_kinds(mask.dense(256, 256), 16, 16))


@pytest.mark.parametrize(("factory", "size"), mask_cases(PRIMITIVES | COMPOSITIONS))
def test_mask_mod_agrees_with_dense(factory: MaskFactory, size: tuple[int, int, int, int]) -> None:
    Tq, Tk, _, _ = size
    mask = factory(Tq, Tk)
    dense = mask.dense(Tq, Tk)
    Bm, Hm = dense.shape[:2]
    mask_mod = mask.mask_mod(Tq, Tk)
    # All pairs through torch.vmap, as FlexAttention evaluates it ...
    vmapped = create_mask(mask_mod, Bm, Hm, Tq, Tk, device="cpu")
    assert torch.equal(vmapped, dense)
    # ... and a few pairs on 0-d tensors, as inside a compiled kernel.
    for b, q, k in [(0, 0, 0), (Bm - 1, Tq - 1, Tk - 1), (Bm - 1, Tq // 2, 3), (0, Tq - 1, 0)]:
        got = mask_mod(torch.tensor(b), torch.tensor(0), torch.tensor(q), torch.tensor(k))
        assert got.dim() == 0
        assert bool(got) == bool(dense[b, 0, q, k])


@pytest.mark.parametrize(("factory", "size"), mask_cases(PRIMITIVES | COMPOSITIONS))
def test_row_counts_equal_dense_sums(factory: MaskFactory, size: tuple[int, int, int, int]) -> None:
    Tq, Tk, _, _ = size
    mask = factory(Tq, Tk)
    assert torch.equal(masks.row_counts(mask, Tq, Tk), mask.dense(Tq, Tk).sum(-1))


@pytest.mark.parametrize(
    "mask",
    [
        masks.causal(),
        masks.sliding_window(100, 37),
        masks.sinks(5) | masks.sliding_window(130),
        masks.key_padding(torch.tensor([300, 129, 0]), side="left"),
        masks.documents(cu_seqlens=torch.tensor([0, 100, 101, 260, 300])) & masks.causal(),
    ],
    ids=["causal", "window", "sinks_or_window", "padding_left", "documents_causal"],
)
def test_row_counts_with_many_full_and_partial_tiles(mask: Mask) -> None:
    """At T=300 row_counts spans several 128-tiles, mixing FULL-tile widths and PARTIAL sums."""
    assert torch.equal(masks.row_counts(mask, 300, 300), mask.dense(300, 300).sum(-1))


# -- bottom-right alignment ---------------------------------------------------------------


def test_causal_bottom_right_alignment() -> None:
    Tq, Tk = 13, 50
    dense = masks.causal().dense(Tq, Tk)[0, 0]
    assert dense[-1].all(), "the last query sees the last key (and every key)"
    assert dense[0].sum() == Tk - Tq + 1, "the first query sits at key position Tk - Tq"
    assert not dense[0, Tk - Tq + 1 :].any()
    assert masks.causal().dense(1, Tk).all(), "a single decoding query sees all keys"


def test_sliding_window_bottom_right_alignment() -> None:
    Tq, Tk = 4, 20
    dense = masks.sliding_window(3, 1).dense(Tq, Tk)[0, 0]
    for i in range(Tq):
        position = i + Tk - Tq
        visible = torch.arange(max(position - 3, 0), min(position + 1, Tk - 1) + 1)
        assert torch.equal(dense[i].nonzero().flatten(), visible)


def test_prefix_lm_is_bidirectional_over_the_prefix_only() -> None:
    dense = masks.prefix_lm(torch.tensor([4, 0])).dense(10, 10)
    assert dense[0, 0, 0, :4].all() and not dense[0, 0, 0, 4:].any()
    assert dense[0, 0, 6, :7].all() and not dense[0, 0, 6, 7:].any()
    assert torch.equal(dense[1, 0], torch.ones(10, 10, dtype=torch.bool).tril())


def test_key_padding_sides() -> None:
    lengths = torch.tensor([3, 6])
    right = masks.key_padding(lengths).dense(2, 6)[:, 0, 0]
    left = masks.key_padding(lengths, side="left").dense(2, 6)[:, 0, 0]
    assert right.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert left.tolist() == [[False] * 3 + [True] * 3, [True] * 6]


def test_documents_from_segment_ids_and_cu_seqlens_agree() -> None:
    cu = torch.tensor([0, 6, 7, 19, 37])
    from_cu = masks.documents(cu_seqlens=cu).dense(37, 37)
    ids = torch.repeat_interleave(torch.arange(4), cu.diff()).view(1, -1)
    assert torch.equal(from_cu, masks.documents(ids).dense(37, 37))
    assert from_cu[0, 0, 6, 6] and not from_cu[0, 0, 6, 5] and not from_cu[0, 0, 6, 7]


def test_composition_dense_is_the_boolean_combination() -> None:
    a, b = masks.sinks(3), masks.sliding_window(4)
    da, db = a.dense(13, 50), b.dense(13, 50)
    assert torch.equal((a & b).dense(13, 50), da & db)
    assert torch.equal((a | b).dense(13, 50), da | db)
    assert torch.equal((~a).dense(13, 50), ~da)
    assert repr(a | b) == "(sinks(3) | sliding_window(4, 0))"


# -- errors -----------------------------------------------------------------------------


def test_sliding_window_rejects_negative_extent() -> None:
    with pytest.raises(ValueError, match=r"left extent must be an int >= 0, got -1"):
        masks.sliding_window(-1)
    with pytest.raises(ValueError, match="right extent"):
        masks.sliding_window(3, -2)


def test_documents_built_for_other_lengths_are_refused() -> None:
    mask = masks.documents(torch.zeros(1, 64, dtype=torch.long))
    q = torch.randn(1, 63, 2, 8)
    with pytest.raises(ValueError, match=r"built for Tq=64, Tk=64 but this call has Tq=63, Tk=63"):
        attnkit.attention(q, q, q, mask=mask)


def test_key_padding_longer_than_keys_is_refused() -> None:
    q = torch.randn(2, 5, 2, 8)
    mask = masks.key_padding(torch.tensor([5, 6]))
    with pytest.raises(ValueError, match=r"lengths \[5, 6\] but the call has only Tk=5 keys"):
        attnkit.attention(q, q, q, mask=mask)


def test_mask_for_another_batch_size_is_refused() -> None:
    q = torch.randn(2, 5, 2, 8)
    mask = masks.causal() & masks.key_padding(torch.tensor([5, 4, 3]))
    with pytest.raises(ValueError, match=r"built for a batch of 3 but this call has B=2"):
        attnkit.attention(q, q, q, mask=mask)


def test_masks_for_different_batches_do_not_combine() -> None:
    mask = masks.key_padding(torch.tensor([1, 2])) & masks.key_padding(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cannot combine masks built for batch sizes 2 and 3"):
        mask.dense(4, 4)


def test_documents_needs_exactly_one_description() -> None:
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of segment_ids"):
        masks.documents()
    with pytest.raises(ValueError, match="exactly one of segment_ids"):
        masks.documents(ids, cu_seqlens=torch.tensor([0, 4]))


def test_cu_seqlens_must_start_at_zero_and_increase() -> None:
    with pytest.raises(ValueError, match="starting at 0"):
        masks.documents(cu_seqlens=torch.tensor([1, 4, 8]))
    with pytest.raises(ValueError, match="non-decreasing"):
        masks.documents(cu_seqlens=torch.tensor([0, 5, 4]))


def test_float_segment_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="integer tensor"):
        masks.documents(torch.zeros(1, 4))


def test_key_padding_side_is_checked() -> None:
    with pytest.raises(ValueError, match="'right' or 'left'"):
        masks.key_padding(torch.tensor([3]), side="top")


@pytest.mark.parametrize("other", [3, torch.ones(4, 4, dtype=torch.bool), None])
def test_masks_compose_only_with_masks(other: object) -> None:
    with pytest.raises(TypeError, match="masks compose only with masks"):
        masks.causal() & other
    with pytest.raises(TypeError, match="masks compose only with masks"):
        masks.causal() | other


# -- cost: the block structure never touches T x T pairs ------------------------------------


class CountingPredicate:
    """Wraps ``Mask.predicate`` of a class and records how many pairs each call evaluates."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type[Mask]):
        self.pairs: list[int] = []
        original = cls.predicate

        def counted(mask, b, h, q, k, Tq, Tk):
            result = original(mask, b, h, q, k, Tq, Tk)
            self.pairs.append(result.numel())
            return result

        monkeypatch.setattr(cls, "predicate", counted)


LONG_MASKS = {
    "causal": lambda: masks.causal(),
    "sinks_or_window": lambda: masks.sinks(4) | masks.sliding_window(255),
    "documents_causal": lambda: (
        masks.documents(cu_seqlens=torch.tensor([0, 5000, 5001, 12000, 16384])) & masks.causal()
    ),
}


@pytest.mark.parametrize("name", LONG_MASKS)
def test_blocks_at_16k_evaluate_no_pairs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    T = 16384
    counters = [
        CountingPredicate(monkeypatch, cls)
        for cls in {type(m) for m in _leaves(LONG_MASKS[name]())}
    ]
    structure = LONG_MASKS[name]().blocks(T, T, 128, 128)
    assert structure.kinds.shape[-2:] == (128, 128)
    assert all(c.pairs == [] for c in counters), "blocks() evaluated the predicate"


def test_row_counts_at_16k_evaluate_only_partial_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    T = 16384
    counter = CountingPredicate(monkeypatch, type(masks.causal()))
    counts = masks.row_counts(masks.causal(), T, T)
    assert torch.equal(counts[0, 0], torch.arange(1, T + 1))
    evaluated = sum(counter.pairs)
    assert evaluated <= 2 * 128 * T, f"evaluated {evaluated} pairs, T*T = {T * T}"


def _leaves(mask: Mask) -> list[Mask]:
    children = [getattr(mask, a) for a in ("left", "right", "inner") if hasattr(mask, a)]
    if not children:
        return [mask]
    return [leaf for child in children for leaf in _leaves(child)]


def test_blocks_follow_the_requested_device() -> None:
    for mask in (masks.full(), masks.causal(), masks.full() & masks.sliding_window(3)):
        assert mask.blocks(64, 64, 16, 16, device="meta").kinds.device.type == "meta"


def test_documents_segment_batches_must_match() -> None:
    with pytest.raises(ValueError, match="segment_ids has batch 1, kv_segment_ids 2"):
        masks.documents(
            torch.zeros(1, 4, dtype=torch.long), kv_segment_ids=torch.zeros(2, 4, dtype=torch.long)
        )


def test_blocks_are_cached_per_size() -> None:
    mask = masks.causal()
    assert mask.blocks(64, 64, 16, 16) is mask.blocks(64, 64, 16, 16)
    assert mask.blocks(64, 64, 16, 16) is not mask.blocks(64, 63, 16, 16)


def test_union_over_batch_heads() -> None:
    mask = masks.key_padding(torch.tensor([16, 0]))
    union = mask.blocks(8, 32, 8, 8).union_over_batch_heads()
    assert union.tolist() == [[PARTIAL, PARTIAL, EMPTY, EMPTY]]
    assert mask.blocks(8, 32, 8, 8).live_fraction() == pytest.approx(2 / 8)


def test_keys_and_from_dense_refuse_wrong_inputs() -> None:
    with pytest.raises(ValueError, match=r"bool tensor \[B, Tk\].*\.bool\(\)"):
        masks.keys(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bool tensor \[B, H, Tq, Tk\]"):
        masks.from_dense(torch.ones(5, 5, dtype=torch.bool))
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="covers 5 keys but this call has Tk=4"):
        attnkit.attention(q, q, q, mask=masks.keys(torch.ones(1, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"is \(4, 5\) but this call has Tq=4, Tk=4"):
        attnkit.attention(q, q, q, mask=masks.from_dense(torch.ones(1, 1, 4, 5, dtype=torch.bool)))


@pytest.mark.parametrize("backend", ["sdpa", "chunked", "flex"])
def test_keys_and_from_dense_run_on_every_backend(backend: str) -> None:
    B, T, H, D = 2, 40, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, :7], keep[1, 20:25] = False, False
    allowed = (torch.rand(1, H, T, T, generator=g) < 0.5) | torch.eye(T, dtype=torch.bool)
    for mask in (masks.keys(keep) & masks.causal(), masks.from_dense(allowed)):
        report = testing.check_against_reference(
            partial(attnkit.attention, backend=backend), q, k, v, mask=mask, grads=backend != "flex"
        )
        report.assert_ok()


def test_equal_masks_built_apart_share_their_derived_objects() -> None:
    built = [masks.sinks(4) | masks.sliding_window(255) for _ in range(2)]
    assert built[0] is not built[1] and built[0].identity == built[1].identity
    assert built[0].blocks(1024, 1024, 64, 64) is built[1].blocks(1024, 1024, 64, 64)
    others = [
        masks.sinks(4) | masks.sliding_window(254),
        masks.sinks(4) & masks.sliding_window(255),
        masks.sinks(5) | masks.sliding_window(255),
        masks.sliding_window(255),
        masks.causal(),
        ~masks.causal(),
        masks.full(),
        masks.block_causal(64),
        masks.prefix_lm(4),  # KeyPrefix(4) | causal: not sinks(4) | window
    ]
    identities = [mask.identity for mask in [built[0], *others]]
    assert None not in identities and len(set(identities)) == len(identities)
    for mask in others:
        assert mask.blocks(1024, 1024, 64, 64) is not built[0].blocks(1024, 1024, 64, 64)


def test_masks_that_carry_tensors_keep_their_own_caches() -> None:
    lengths = torch.tensor([5, 8])
    padded = [masks.key_padding(lengths) for _ in range(2)]
    segments = torch.tensor([[0] * 4 + [1] * 4, [0] * 8])
    documents = [masks.documents(segments) for _ in range(2)]
    for mask in (*padded, *documents, masks.prefix_lm(lengths)):
        assert mask.identity is None
    for a, b in (padded, documents):
        assert a.blocks(8, 8, 4, 4) is not b.blocks(8, 8, 4, 4)


def test_shared_plans_never_cross_patterns() -> None:
    q, k, v = testing.Case("shared", 1, 300, 300, 2, 2, 16).make(torch.float32, seed=3)
    for left in (63, 63, 64, 63):  # equal masks built apart, then a different one, then back
        mask = masks.sinks(2) | masks.sliding_window(left)
        run = partial(attnkit.attention, backend="blocksparse")
        testing.check_against_reference(run, q, k, v, mask=mask).assert_ok()


def test_masks_first_used_inside_private_caches_build_anew() -> None:
    shared = masks.causal()
    structure = shared.blocks(512, 512, 64, 64)
    with masks.base.private_caches():
        fresh = masks.causal()
        assert fresh.blocks(512, 512, 64, 64) is not structure
    assert masks.causal().blocks(512, 512, 64, 64) is structure


def test_grid_masks_share_by_their_axes_and_grid() -> None:
    grid = (12, 10)
    same = [masks.neighborhood(5, grid) for _ in range(2)]
    assert same[0].blocks(120, 120, 16, 16) is same[1].blocks(120, 120, 16, 16)
    others = [
        masks.neighborhood(5, grid, dilation=2),
        masks.neighborhood(5, grid, causal=(True, False)),
        masks.neighborhood((5, 3), grid),
        masks.neighborhood(5, (10, 12)),
        masks.halo(4, 1, grid),
    ]
    identities = [mask.identity for mask in [same[0], *others]]
    assert len(set(identities)) == len(identities)


def test_a_mask_says_whether_it_is_data_of_one_batch_and_whether_it_unravels_a_grid():
    from_data = [
        masks.documents(torch.tensor([[0, 0, 1, 1]])),
        masks.key_padding(torch.tensor([3])),
        masks.keys(torch.tensor([[True, False, True, True]])),
        masks.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool)),
    ]
    rules = [masks.causal(), masks.sliding_window(2), masks.sinks(1), masks.neighborhood(3)]
    for mask in from_data:
        assert mask.data_dependent and (mask & masks.causal()).data_dependent
        assert (~mask).data_dependent
    for mask in rules:
        assert not mask.data_dependent and not (mask | masks.causal()).data_dependent
    assert masks.neighborhood(3).unravels_grid
    assert (masks.neighborhood(3) & masks.causal()).unravels_grid
    assert not masks.causal().unravels_grid and not masks.sliding_window(4).unravels_grid
