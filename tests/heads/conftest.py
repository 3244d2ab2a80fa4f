"""Fixtures for head-layout tests (helpers live in ``layout_helpers``)."""

from __future__ import annotations

import pytest

from attnkit import masks
from attnkit.attend import Attend


@pytest.fixture
def causal() -> Attend:
    """``Attend(mask=causal())`` on the automatic backend."""
    return Attend(mask=masks.causal())
