"""The chunked backend: bfloat16 tiles computed in float32 where bfloat16 matmuls are emulated."""

from __future__ import annotations

import torch

import attnkit
from attnkit import masks
from attnkit.backends import chunked
from attnkit.call import AttentionCall
from attnkit.machine import Capabilities
from attnkit.testing import check_against_reference

AVX2 = Capabilities("cpu", "an AVX2 CPU", "AVX2", frozenset({"avx2", "fma"}))
AVX512_BF16 = Capabilities(
    "cpu", "an AVX-512 CPU", "AVX512", frozenset({"avx2", "fma", "avx512f", "avx512_bf16"})
)


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(1, 300, 2, 16, generator=g).to(dtype) for _ in range(3))


def test_bfloat16_tiles_run_in_float32_only_where_bfloat16_matmuls_are_emulated():
    bf16 = AttentionCall(*_inputs(torch.bfloat16))
    assert chunked.matmul_dtype(bf16, AVX2) == torch.float32
    assert chunked.matmul_dtype(bf16, AVX512_BF16) == torch.bfloat16
    f32 = AttentionCall(*_inputs(torch.float32))
    assert chunked.matmul_dtype(f32, AVX2) == torch.float32


def test_emulated_bfloat16_gives_the_float32_result_rounded_once(monkeypatch):
    monkeypatch.setattr(chunked, "capabilities", lambda device: AVX2)
    q, k, v = _inputs(torch.bfloat16)
    out = attnkit.attention(q, k, v, mask=masks.causal(), backend="chunked")
    wide = attnkit.attention(
        *(t.float() for t in (q, k, v)), mask=masks.causal(), backend="chunked"
    )
    torch.testing.assert_close(out, wide.to(torch.bfloat16), rtol=0, atol=0)
    report = check_against_reference(
        lambda *a, **o: attnkit.attention(*a, **o, backend="chunked"), q, k, v,
        mask=masks.causal(),
    )  # fmt: skip
    assert report.ok, report


def test_runs_longer_than_max_keys_are_cut_into_pieces_and_merged(monkeypatch):
    """A row of live tiles longer than ``MAX_KEYS`` runs as several pieces merged by their
    log-sum-exp: the result is the reference's, forward and backward."""
    monkeypatch.setattr(chunked, "MAX_KEYS", 2 * chunked.BLOCK_K)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 5 * chunked.BLOCK_K + 7, 2, 8, generator=g) for _ in range(3))
    for mask in (None, masks.causal(), masks.sliding_window(700)):
        report = check_against_reference(
            lambda *a, **o: attnkit.attention(*a, **o, backend="chunked"), q, k, v, mask=mask
        )
        assert report.ok, report
