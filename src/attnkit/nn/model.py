"""``TransformerBlock`` and ``TinyLM``: a small pre-norm decoder built from ``Attention``, so
benchmarks can train tiny models with any mechanism chosen by name.

The block is the Llama recipe (RMSNorm, attention, RMSNorm, SwiGLU MLP, residuals); ``TinyLM``
stacks blocks between a token embedding and a tied output head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.masks.base import Mask
from attnkit.nn.attention import Attention, AttentionConfig
from attnkit.nn.cache import Cache, DenseCache


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``. ``x [B, T, C]``;
    ``forward`` takes ``Attention.forward``'s arguments."""

    def __init__(self, attention: AttentionConfig, mlp_ratio: float = 8 / 3):
        super().__init__()
        C = attention.d_model
        hidden = int(mlp_ratio * C)
        self.attn_norm = nn.RMSNorm(C)
        self.attn = Attention(attention)
        self.mlp_norm = nn.RMSNorm(C)
        self.gate_up = nn.Linear(C, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, C, bias=False)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: Cache | None = None,
        layer: int = 0,
        mask: Mask | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions, cache, layer, mask)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


@dataclass(frozen=True)
class TinyLMConfig:
    """A decoder-only LM: ``n_layers`` blocks of the same ``attention`` config."""

    vocab_size: int
    n_layers: int
    attention: AttentionConfig
    mlp_ratio: float = 8 / 3


class TinyLM(nn.Module):
    """Decoder-only language model: ``ids [B, T] -> logits [B, T, vocab]``."""

    def __init__(self, config: TinyLMConfig):
        super().__init__()
        self.config = config
        C = config.attention.d_model
        self.embed = nn.Embedding(config.vocab_size, C)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.attention, config.mlp_ratio) for _ in range(config.n_layers)
        )
        self.norm = nn.RMSNorm(C)
        nn.init.normal_(self.embed.weight, std=C**-0.5)

    def forward(self, ids: Tensor, cache: Cache | None = None) -> Tensor:
        x = self.embed(ids)
        for index, block in enumerate(self.blocks):
            x = block(x, cache=cache, layer=index)
        return self.norm(x) @ self.embed.weight.T

    def loss(self, ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy of ``ids [B, T]``."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, cache: Cache | None = None) -> Tensor:
        """Greedy decoding with a KV cache: the prompt once, then one token per step.
        Returns ``[B, T + max_new_tokens]``."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        cache = DenseCache() if cache is None else cache
        logits = self(ids, cache)
        out = [ids]
        for _ in range(max_new_tokens):
            token = logits[:, -1:].argmax(-1)
            out.append(token)
            logits = self(token, cache)
        return torch.cat(out, dim=1)
