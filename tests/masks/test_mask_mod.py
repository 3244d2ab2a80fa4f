"""``masks.from_mask_mod``: FlexAttention mask_mods (hand-written and attention-gym's) as masks:
exact tiles against brute force, the pattern against the mask_mod called pair by pair on
scalars, composition with built-in patterns, every backend forward and backward, and errors."""

from __future__ import annotations

import pytest
import torch
from mask_helpers import (
    TILINGS,
    assert_blocks_exact,
    assert_blocks_sound,
    brute_force_kinds,
    check_backends,
)

from attnkit import masks, testing
from attnkit.masks import mask_mod

attn_gym = pytest.importorskip("attn_gym.masks")


def window(b, h, q, k):
    return (q - k >= 0) & (q - k < 5)


def per_head_stride(b, h, q, k):
    """Head h sees every (h + 1)-th earlier key: a pattern that differs per head."""
    return (q >= k) & ((q - k) % (h + 1) == 0)


DOCUMENTS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], [0] * 6 + [1] * 7])


def documents(b, h, q, k):
    return DOCUMENTS[b, q] == DOCUMENTS[b, k]


def pairwise(fn, B: int, H: int, Tq: int, Tk: int) -> torch.Tensor:
    """``fn`` called once per pair on scalar tensors, as FlexAttention's vmap calls it."""
    out = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                for j in range(Tk):
                    args = (torch.tensor(b), torch.tensor(h), torch.tensor(i), torch.tensor(j))
                    out[b, h, i, j] = bool(fn(*args))
    return out


HAND_WRITTEN = {
    "window": (window, 1, 1),
    "per_head_stride": (per_head_stride, 1, 3),
    "documents": (documents, 2, 1),
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_the_pattern_is_the_mask_mod_and_its_tiles_are_exact(name: str) -> None:
    fn, B, H = HAND_WRITTEN[name]
    mask = masks.from_mask_mod(fn, batch_size=B, num_heads=H)
    T = DOCUMENTS.shape[1]
    assert torch.equal(mask.dense(T, T), pairwise(fn, B, H, T, T))
    assert_blocks_exact(mask, T, T)


def test_tiles_are_classified_in_bounded_key_slices(monkeypatch) -> None:
    monkeypatch.setattr(mask_mod, "KEY_SLICE", 6)  # fewer keys per slice than one row of tiles
    mask = masks.from_mask_mod(per_head_stride, num_heads=3, name="sliced")
    dense = mask.dense(40, 53)
    for bq, bk in TILINGS.values():
        assert torch.equal(mask.blocks(40, 53, bq, bk).kinds, brute_force_kinds(dense, bq, bk))


def test_it_composes_with_built_in_patterns_and_is_cached_per_mask_mod() -> None:
    mask = masks.from_mask_mod(per_head_stride, num_heads=3) | masks.sinks(2)
    T = 30
    expected = pairwise(per_head_stride, 1, 3, T, T) | masks.sinks(2).dense(T, T)
    assert torch.equal(mask.dense(T, T), expected)
    # composed tiles are sound (min/max of the parts' kinds), exact where the parts' are
    assert_blocks_sound(mask & masks.causal(), T, T)
    assert_blocks_sound(~mask, T, T)
    again = masks.from_mask_mod(per_head_stride, num_heads=3)
    assert again.blocks(64, 64, 16, 16) is masks.from_mask_mod(per_head_stride, num_heads=3).blocks(
        64, 64, 16, 16
    )


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_every_backend_runs_it_forward_and_backward(name: str) -> None:
    fn, B, H = HAND_WRITTEN[name]
    mask = masks.from_mask_mod(fn, batch_size=B, num_heads=H)
    T = DOCUMENTS.shape[1]
    case = testing.Case(name, B=B, Tq=T, Tk=T, Hq=3, Hkv=1, D=8)  # GQA: 3 query heads, 1 KV
    check_backends(mask, case, backends=("reference", "sdpa", "chunked", "blocksparse"))


def _attn_gym_masks(T: int) -> dict[str, tuple]:
    """attention-gym's mask_mods at length ``T`` (a 2-D grid of ``T`` tokens where they need
    one), with the batch size and head count each distinguishes."""
    lengths = [5, 9, T - 14]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    side = int(T**0.5)
    return {
        "sliding_window": (attn_gym.generate_sliding_window(7), 1, 1),
        "prefix_lm": (attn_gym.generate_prefix_lm_mask(6), 1, 1),
        "document": (attn_gym.generate_doc_mask_mod(attn_gym.causal_mask, offsets), 1, 1),
        "natten_2d": (attn_gym.generate_natten(side, side, 3, 3), 1, 1),
        "block_diffusion": (attn_gym.generate_block_diffusion_mask(T // 2, 4), 1, 1),
        "sta_2d": (
            attn_gym.generate_sta_mask_mod_2d(
                canvas_hw=(side, side), kernel_hw=(4, 4), tile_hw=(2, 2), text_seq_len=0
            ),
            1,
            1,
        ),
    }


@pytest.mark.parametrize(
    "name",
    ["sliding_window", "prefix_lm", "document", "natten_2d", "block_diffusion", "sta_2d"],
)
def test_attention_gym_masks_run_on_every_backend_alone_and_composed(name: str) -> None:
    T = 36
    fn, B, H = _attn_gym_masks(T)[name]
    mask = masks.from_mask_mod(fn, batch_size=B, num_heads=H, name=name)
    assert torch.equal(mask.dense(T, T)[0, 0, :6, :6], pairwise(fn, 1, 1, 6, 6)[0, 0])
    assert_blocks_exact(mask, T, T)
    case = testing.Case(name, B=1, Tq=T, Tk=T, Hq=4, Hkv=2, D=8)
    for composed in (mask, mask & masks.causal(), mask | masks.sinks(4)):
        check_backends(composed, case, backends=("sdpa", "chunked", "blocksparse"))


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        masks.from_mask_mod(window, batch_size=0)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        masks.from_mask_mod(window, num_heads=2.0)
    with pytest.raises(TypeError, match=r"takes a mask_mod\(b, h, q_idx, kv_idx\)"):
        masks.from_mask_mod(torch.ones(4, 4, dtype=torch.bool))
