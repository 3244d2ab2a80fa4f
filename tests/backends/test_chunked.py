"""The chunked backend: rows of live tiles longer than ``MAX_KEYS`` run as merged pieces."""

from __future__ import annotations

import torch

import attnkit
from attnkit import masks
from attnkit.backends import chunked
from attnkit.testing import check_against_reference


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
