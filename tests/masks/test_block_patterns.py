"""Block-level patterns (block-causal, chunked, shifted chunks: LongLoRA / SCCA, S2-Attention,
PowerAttention) against dense definitions written here; exact block structure; the claims
they rest on; errors; backends with GQA."""

from __future__ import annotations

import pytest
import torch
from mask_helpers import assert_blocks_exact, check_backends, dense_from

from attnkit import masks, testing
from attnkit.masks import Mask

SIZES = [(37, 37), (13, 50), (1, 50)]


def s2_dkernel_dense(
    heads: int, kv_heads: int, T: int, block: int, local: int, stride: int, dense_heads: int = 0
) -> torch.Tensor:
    """DKernel's ``get_sparse_attn_mask`` rebuilt: a block mask per KV head (repeated over the
    query heads of its group), expanded to tokens with ``kron`` and intersected with causal.
    The head step divides by the KV head count (DKernel: by the query head count; the same
    without GQA)."""
    n = -(-T // block)
    step = max(1, stride // kv_heads)
    qb, kb = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    per_kv = []
    for h in range(kv_heads):
        strided = (torch.arange(n) + h * step) % stride == 0
        if h >= kv_heads - dense_heads:
            strided = torch.ones(n, dtype=torch.bool)
        per_kv.append((qb >= kb) & ((qb - kb < local) | strided.view(1, -1)))
    blocks = torch.stack(per_kv).repeat_interleave(heads // kv_heads, 0).int()
    tokens = torch.kron(blocks, torch.ones(block, block, dtype=torch.int))[:, :T, :T].bool()
    return (tokens & torch.ones(T, T, dtype=torch.bool).tril()).unsqueeze(0)


DEFINITIONS: dict[str, tuple[Mask, object, int]] = {
    # name: (mask, rule(h, p, k), heads)
    "block_causal_5": (masks.block_causal(5), lambda h, p, k: k // 5 <= p // 5, 1),
    "chunked_6": (masks.chunked(6), lambda h, p, k: k // 6 == p // 6, 1),
    "chunked_6_causal": (
        masks.chunked(6, causal=True),
        lambda h, p, k: k // 6 == p // 6 and k <= p,
        1,
    ),
    "scca_fixed_8": (
        masks.scca(8, 4),
        lambda h, p, k: p // 8 == (k + 4 * (h >= 2)) // 8 and k <= p,
        4,
    ),
    "scca_flow_8": (
        masks.scca(8, 4, "flow"),
        lambda h, p, k: p // 8 == (k + 2 * h) // 8 and k <= p,
        4,
    ),
    "scca_flow_7_bidirectional": (
        masks.scca(7, 3, "flow", causal=False),
        lambda h, p, k: p // 7 == (k + (7 * h) // 3) // 7,
        3,
    ),
    "longlora_8": (
        masks.longlora_shift(8, 4),
        lambda h, p, k: (p + 4 * (h >= 2)) // 8 == (k + 4 * (h >= 2)) // 8 and k <= p,
        4,
    ),
    "shifted_chunks_queries": (
        masks.shifted_chunks(6, [0, 2, 5], shift_queries=True, causal=False),
        lambda h, p, k: (p + [0, 2, 5][h]) // 6 == (k + [0, 2, 5][h]) // 6,
        3,
    ),
    "power_3": (
        masks.power_attention(3),
        lambda h, p, k: k <= p and (p // 3 - k // 3) in (0, 1, 2, 4, 8, 16),
        1,
    ),
    "power_4_local_2_sink_1": (
        masks.power_attention(4, local_blocks=2, sink_blocks=1),
        lambda h, p, k: k <= p and ((p // 4 - k // 4) in (0, 1, 2, 4, 8) or k < 4),
        1,
    ),
}


@pytest.mark.parametrize("name", list(DEFINITIONS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{a}x{b}" for a, b in SIZES])
def test_pattern_matches_its_definition(name: str, size: tuple[int, int]) -> None:
    mask, rule, heads = DEFINITIONS[name]
    Tq, Tk = size
    assert torch.equal(mask.dense(Tq, Tk), dense_from(rule, Tq, Tk, heads))


@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_blocks_are_exact(name: str) -> None:
    mask, _, _ = DEFINITIONS[name]
    for Tq, Tk in SIZES:
        assert_blocks_exact(mask, Tq, Tk)


S2_CASES = {  # heads, kv heads, block, local, stride, dense heads
    "mha": (4, 4, 4, 2, 3, 0),
    "gqa_dense_head": (8, 2, 3, 1, 4, 1),
    "one_block_window": (6, 3, 5, 1, 3, 0),
}


@pytest.mark.parametrize("name", list(S2_CASES))
def test_s2_attention_matches_dkernel(name: str) -> None:
    heads, kv, block, local, stride, dense = S2_CASES[name]
    mask = masks.s2_attention(heads, block, local, stride, num_kv_heads=kv, dense_heads=dense)
    expected = s2_dkernel_dense(heads, kv, 50, block, local, stride, dense)
    assert torch.equal(mask.dense(50, 50), expected)
    assert torch.equal(mask.dense(13, 50), expected[:, :, -13:])
    assert_blocks_exact(mask, 50, 50)
    assert_blocks_exact(mask, 13, 50)


def test_s2_heads_together_cover_the_causal_context() -> None:
    mask = masks.s2_attention(8, block_size=4, local_blocks=1, vert_stride=4)
    union = mask.dense(64, 64).any(1)
    assert torch.equal(union, masks.causal().dense(64, 64)[:, 0])
    per_head = mask.dense(64, 64).float().mean((0, 2, 3))
    assert bool((per_head < 0.5 * union.float().mean()).all()), "each head sees a shard only"


def test_power_attention_receptive_field_doubles_per_layer() -> None:
    """After L layers block i reaches block i - d iff d is a sum of L powers of two (or 0), i.e.
    popcount(d) <= L: a complete, continuous field of at least 2^L blocks (the paper's claim)."""
    n = 70
    allowed = masks.power_attention(1).dense(n, n)[0, 0].int()
    distance = torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)
    popcount = sum((distance.clamp(min=0) >> bit) & 1 for bit in range(8))
    reach = torch.eye(n, dtype=torch.int)
    for layer in range(1, 6):
        reach = ((allowed @ reach) > 0).int()
        assert torch.equal(reach.bool(), (distance >= 0) & (popcount <= layer)), layer
        assert bool(reach.bool()[-1, n - 2**layer :].all())


def test_power_attention_cost_is_logarithmic() -> None:
    keys = masks.power_attention(1).dense(1, 1024)[0, 0, 0].sum().item()
    assert keys == 11  # its own block and the blocks at distances 1, 2, 4, ..., 512


def test_longlora_equals_the_rolled_groups_except_across_the_wrap() -> None:
    """LongLoRA rolls half the heads by -G/2 and attends inside groups: token x is in group
    ((x - G/2) mod T) // G. Ours cuts the wrapped group: the only difference is between the
    first and the last half-groups."""
    T, G = 48, 8
    ours = masks.longlora_shift(G, 2).dense(T, T)[0, 1]
    x = torch.arange(T)
    group = ((x - G // 2) % T) // G
    rolled = (group.view(-1, 1) == group.view(1, -1)) & torch.ones(T, T, dtype=torch.bool).tril()
    wrap = (x < G // 2).view(-1, 1) & (x >= T - G // 2).view(1, -1)
    wrap = wrap | wrap.T
    assert torch.equal(ours[~wrap], rolled[~wrap])
    assert not ours[wrap].any()


def test_full_size_blocks_are_dense_limits() -> None:
    assert bool(masks.chunked(40).dense(40, 40).all())
    assert torch.equal(masks.chunked(40, causal=True).dense(40, 40), masks.causal().dense(40, 40))
    assert torch.equal(masks.block_causal(1).dense(40, 40), masks.causal().dense(40, 40))
    one_block = masks.s2_attention(2, block_size=64, local_blocks=1).dense(40, 40)
    assert bool((one_block == masks.causal().dense(40, 40)).all())
    wide = masks.power_attention(4, local_blocks=10).dense(40, 40)
    assert torch.equal(wide, masks.causal().dense(40, 40))


ERRORS = {
    "zero_block": (lambda: masks.block_causal(0), ValueError, "block_size must be an int >= 1"),
    "float_chunk": (lambda: masks.chunked(2.5), ValueError, "block_size must be an int >= 1"),
    "scca_pattern": (
        lambda: masks.scca(8, 4, "spiral"),
        ValueError,
        "one of \\['fixed', 'flow'\\]",
    ),
    "longlora_odd": (lambda: masks.longlora_shift(7, 4), ValueError, "must be even"),
    "shift_floats": (lambda: masks.shifted_chunks(4, [0.5]), ValueError, "one integer shift"),
    "s2_groups": (lambda: masks.s2_attention(6, num_kv_heads=4), ValueError, "must divide"),
    "s2_dense": (lambda: masks.s2_attention(4, dense_heads=5), ValueError, "dense_heads"),
    "power_sinks": (lambda: masks.power_attention(4, sink_blocks=-1), ValueError, "sink_blocks"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_arguments_are_refused(name: str) -> None:
    build, error, message = ERRORS[name]
    with pytest.raises(error, match=message):
        build()


def test_more_queries_than_keys_are_refused() -> None:
    for mask in (masks.block_causal(4), masks.chunked(4), masks.power_attention(4)):
        with pytest.raises(ValueError, match="needs Tq <= Tk"):
            mask.blocks(20, 10)


def test_gqa_forward_backward_on_every_backend() -> None:
    mask = masks.s2_attention(8, block_size=4, local_blocks=2, vert_stride=4, num_kv_heads=2)
    check_backends(mask, testing.Case("gqa_50", B=2, Tq=50, Tk=50, Hq=8, Hkv=2, D=16))


TILED = {
    "block_causal": lambda: masks.block_causal(6),
    "chunked_causal": lambda: masks.chunked(7, causal=True),
    "scca_flow": lambda: masks.scca(8, 8, "flow"),
    "longlora": lambda: masks.longlora_shift(10, 8),
    "power": lambda: masks.power_attention(4, sink_blocks=1),
}


@pytest.mark.parametrize("name", list(TILED))
def test_tiled_backends_match_reference(name: str) -> None:
    case = testing.Case("gqa_50", B=1, Tq=50, Tk=50, Hq=8, Hkv=2, D=16)
    check_backends(TILED[name](), case, backends=("chunked",))
