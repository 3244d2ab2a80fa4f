"""Compiled kernels: loading, and the reason given when they are not used."""

from __future__ import annotations

import pytest

from attnkit.backends import native


@pytest.fixture
def fresh_build_cache():
    native._build.cache_clear()
    yield
    native._build.cache_clear()


def test_disabled_by_environment_says_so(monkeypatch, fresh_build_cache) -> None:
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    assert native.load("blocksparse_cpu") is None
    assert "ATTNKIT_NATIVE=0" in native.unavailable("blocksparse_cpu")


def test_a_failed_build_warns_once_and_is_reported_not_raised(fresh_build_cache) -> None:
    with pytest.warns(RuntimeWarning, match="pure-PyTorch path runs instead"):
        assert native.load("no_such_kernel") is None
    assert native.load("no_such_kernel") is None  # cached: no second warning, no second build
    assert "no_such_kernel.cpp" in native.unavailable("no_such_kernel")
