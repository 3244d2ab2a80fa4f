from __future__ import annotations

import pytest

from attnkit import data


def test_the_corpus_has_the_38_plays_without_markdown() -> None:
    assert len(data.plays()) == 38
    text = data.play_text("hamlet")
    assert "To be, or not to be" in text
    assert "**" not in text and "\n#" not in text and not text.startswith("#")


def test_passage_is_the_requested_lines() -> None:
    lines = data.play_text("macbeth").splitlines()
    assert data.passage("macbeth", 100, 5).splitlines() == lines[100:105]


def test_bad_requests_are_refused() -> None:
    with pytest.raises(KeyError, match=r"known plays: .*hamlet"):
        data.play_text("hamlet-2")
    with pytest.raises(ValueError, match="cannot take"):
        data.passage("macbeth", 10**6, 5)
