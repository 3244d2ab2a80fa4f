"""Gated attention output: a query-dependent sigmoid gate on each head's SDPA output.

"Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free"
(Qiu et al., 2025). The gate sits at position G1 of the paper, after scaled dot-product
attention and before the heads are concatenated and projected:

    Y_h = SDPA_h(Q, K, V) * sigmoid(X W_g,h)            X: the layer input [B, T, C]

Two forms: head-wise (one scalar per token and head, ``W_g`` is ``C × H``) and element-wise
(one gate per channel, ``C × H·Dv``). The gate adds a non-linearity between the value and
output projections (whose product is otherwise low-rank) and is sparse, which the authors find
removes the attention sink. Their Qwen3 code computes the gate from the layer's (normalised)
hidden states through extra columns of the query projection, without bias by default; a
separate linear map of ``x``, as here, is the same function.

With gate logits ``-> +inf`` the gate is 1 and the layer is plain attention: ``OutputGate``
with zero weights and a large bias (``sigmoid(100) == 1`` in float32) returns ``out``
unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Gate width per head for each kind, given the value head dim.
_GATE_WIDTH = {
    "headwise": lambda head_dim: 1,
    "elementwise": lambda head_dim: head_dim,
}


def _check(out: Tensor, gate_logits: Tensor) -> None:
    if out.dim() != 4 or gate_logits.dim() != 4:
        raise ValueError(
            f"gate_output needs out [B, T, H, Dv] and gate_logits [B, T, H, 1 or Dv] (4-D), "
            f"got {tuple(out.shape)} and {tuple(gate_logits.shape)}"
        )
    if gate_logits.shape[:3] != out.shape[:3] or gate_logits.shape[3] not in (1, out.shape[3]):
        raise ValueError(
            f"gate_logits {tuple(gate_logits.shape)} do not fit out {tuple(out.shape)}: use "
            f"[B, T, H, 1] (head-wise) or [B, T, H, {out.shape[3]}] (element-wise)"
        )


def gate_output(out: Tensor, gate_logits: Tensor) -> Tensor:
    """``out * sigmoid(gate_logits)``: the G1 output gate of Qiu et al. (2025).

    Args:
        out: the attention output ``[B, T, H, Dv]``.
        gate_logits: ``[B, T, H, 1]`` (head-wise) or ``[B, T, H, Dv]`` (element-wise).

    Returns:
        ``[B, T, H, Dv]``. Logits ``-> +inf`` give ``out`` (plain attention).
    """
    _check(out, gate_logits)
    return out * torch.sigmoid(gate_logits).to(out.dtype)


def gate_output_reference(out: Tensor, gate_logits: Tensor) -> Tensor:
    """``gate_output`` written head by head: ``Y_h = O_h / (1 + exp(-G_h))``."""
    _check(out, gate_logits)
    heads = [
        out[:, :, h] / (1 + torch.exp(-gate_logits[:, :, h].to(out.dtype)))
        for h in range(out.shape[2])
    ]
    return torch.stack(heads, dim=2)


class OutputGate(nn.Module):
    """The gate's projection ``x [B, T, C] -> logits`` and its application to ``out``.

    "Gated Attention for Large Language Models" (Qiu et al., 2025). Call it between the
    attention output and the output projection:

        out = attnkit.attention(q, k, v, mask=...)   # [B, T, H, Dv]
        out = gate(x, out)                           # x: the layer input [B, T, C]

    Args:
        d_model: ``C``, the width of the layer input.
        n_heads: ``H``, heads of ``out``.
        head_dim: ``Dv``, the value head dim of ``out``.
        kind: ``"headwise"`` (``H`` gates per token) or ``"elementwise"`` (``H·Dv``).
        bias: add a learnable bias to the logits (the authors' default follows the query
            projection, which has none in Qwen3).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        kind: str = "headwise",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if kind not in _GATE_WIDTH:
            raise ValueError(f"unknown gate kind {kind!r}; choose one of {', '.join(_GATE_WIDTH)}")
        for name, n in (("d_model", d_model), ("n_heads", n_heads), ("head_dim", head_dim)):
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        self.kind = kind
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.width = _GATE_WIDTH[kind](head_dim)
        self.proj = nn.Linear(d_model, n_heads * self.width, bias=bias)

    def logits(self, x: Tensor) -> Tensor:
        """Gate logits ``[B, T, H, 1 or Dv]`` for the layer input ``x [B, T, C]``."""
        if x.dim() != 3 or x.shape[-1] != self.proj.in_features:
            raise ValueError(
                f"OutputGate expects x [B, T, {self.proj.in_features}], got {tuple(x.shape)}"
            )
        return self.proj(x).view(*x.shape[:2], self.n_heads, self.width)

    def forward(self, x: Tensor, out: Tensor) -> Tensor:
        """Gate ``out [B, T, H, Dv]`` with logits from ``x [B, T, C]``; same shape as ``out``."""
        if out.dim() != 4 or out.shape[2:] != (self.n_heads, self.head_dim):
            raise ValueError(
                f"OutputGate was built for out [B, T, {self.n_heads}, {self.head_dim}], "
                f"got {tuple(out.shape)}"
            )
        return gate_output(out, self.logits(x))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n_heads={self.n_heads}, head_dim={self.head_dim}"
