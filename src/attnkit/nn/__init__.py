"""Layers built on ``attnkit.attention``: a configurable ``Attention`` layer, a Llama-style
``TransformerBlock`` and a small decoder ``TinyLM``; every part is chosen by name.

    from attnkit import nn as ak
    config = ak.AttentionConfig(d_model=256, n_heads=8, n_kv_heads=2, mechanism="sliding_window")
    model = ak.TinyLM(ak.TinyLMConfig(vocab_size=256, n_layers=4, attention=config))
"""

from attnkit.attend import Attend
from attnkit.nn.attention import Attention, AttentionConfig, mechanism_attend
from attnkit.nn.cache import Cache, DenseCache, StateCache
from attnkit.nn.linear import LinearAttend
from attnkit.nn.model import TinyLM, TinyLMConfig, TransformerBlock
from attnkit.nn.neighborhood import (
    NeighborhoodAttention,
    NeighborhoodAttention1d,
    NeighborhoodAttention2d,
    NeighborhoodAttention3d,
    NeighborhoodBias,
)
from attnkit.nn.positional import POSITIONAL, Positional

__all__ = [
    "POSITIONAL",
    "Attend",
    "Attention",
    "AttentionConfig",
    "Cache",
    "DenseCache",
    "LinearAttend",
    "NeighborhoodAttention",
    "NeighborhoodAttention1d",
    "NeighborhoodAttention2d",
    "NeighborhoodAttention3d",
    "NeighborhoodBias",
    "Positional",
    "StateCache",
    "TinyLM",
    "TinyLMConfig",
    "TransformerBlock",
    "mechanism_attend",
]
