"""Layers built on ``attnkit.attention``: ``Attend`` (the per-head attention call)."""

from attnkit.nn.attend import Attend

__all__ = ["Attend"]
