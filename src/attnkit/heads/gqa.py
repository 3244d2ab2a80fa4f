"""MHA / GQA / MQA: query heads sharing key/value heads in groups.

"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints"
(Ainslie, Lee-Thorp, de Jong, Zemlyanskiy, Lebrón, Sanghai, 2023); MQA: "Fast Transformer
Decoding: One Write-Head is All You Need" (Shazeer, 2019); MHA: "Attention Is All You Need"
(Vaswani et al., 2017).

``Hq`` query heads, ``Hkv`` key/value heads; query head ``h`` reads KV head ``h // (Hq / Hkv)``.
MHA is ``Hkv = Hq``, MQA ``Hkv = 1``. Weights follow Hugging Face Llama: ``q_proj.weight
[Hq*D, C]``, ``k_proj``/``v_proj`` ``[Hkv*D, C]``, head ``h`` = rows ``h*D:(h+1)*D``.
``from_mha`` is the paper's uptraining initialisation: each group's K/V heads mean-pooled.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.attend import Attend
from attnkit.heads.base import (
    HeadLayout,
    Rotary,
    check_divides,
    check_positive,
    default_positions,
    rotate,
    softmax_head,
    split_heads,
)


class GroupedQueryAttention(HeadLayout):
    """GQA heads (Ainslie et al., 2023, "GQA: Training Generalized Multi-Query Transformer
    Models from Multi-Head Checkpoints"): ``forward(x [B, T, C], attend, rotary, positions) ->
    [B, T, Hq, D]``.

    ``q = rotary(x Wq^T)``, ``k = rotary(x Wk^T)``, ``v = x Wv^T`` split into heads, then
    ``attend(q, k, v)`` with ``Hkv`` key/value heads (never expanded here). KV cache per token:
    ``2 * Hkv * D`` numbers.

    Args:
        d_model: input width ``C``.
        n_heads: query heads ``Hq``.
        head_dim: ``D``.
        n_kv_heads: key/value heads ``Hkv`` (divides ``Hq``); None = ``Hq`` (MHA).
        bias: biases on the q/k/v projections (Qwen2 has them, Llama does not).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        check_positive(d_model=d_model, n_heads=n_heads, head_dim=head_dim, n_kv_heads=n_kv_heads)
        check_divides(n_heads, n_kv_heads, "n_heads", "n_kv_heads")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = self.value_dim = self.rotary_dim = head_dim
        self.has_bias = bias
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Un-rotated ``q [B, T, Hq, D]``, ``k``/``v`` ``[B, T, Hkv, D]``."""
        q = split_heads(self.q_proj(x), self.n_heads)
        k = split_heads(self.k_proj(x), self.n_kv_heads)
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        return q, k, v

    def qkv(
        self, x: Tensor, rotary: Rotary | None, positions: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``project`` then RoPE on q and k: what ``attend`` receives."""
        self.check_input(x)
        positions = default_positions(x, positions)
        q, k, v = self.project(x)
        return rotate(rotary, q, positions), rotate(rotary, k, positions), v

    def forward(
        self,
        x: Tensor,
        attend: Attend,
        rotary: Rotary | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        return attend(*self.qkv(x, rotary, positions))

    def kv_cache_dims(self) -> dict[str, int]:
        """``{"k": Hkv*D, "v": Hkv*D}`` (MHA: ``Hq*D`` each, MQA: ``D`` each)."""
        return {"k": self.n_kv_heads * self.head_dim, "v": self.n_kv_heads * self.head_dim}

    @classmethod
    def from_mha(cls, mha: GroupedQueryAttention, n_kv_heads: int) -> GroupedQueryAttention:
        """Convert an MHA layout into GQA with ``n_kv_heads`` groups (Ainslie et al., 2023, §2.1):
        query weights are copied; each group's key and value heads (consecutive heads
        ``g*G:(g+1)*G``) are mean-pooled into one. ``n_kv_heads = 1`` gives MQA.

        Exact cases: ``n_kv_heads = Hq`` reproduces ``mha``; an MHA whose K/V heads are equal
        within each group gives the same outputs after conversion.
        """
        if mha.n_kv_heads != mha.n_heads:
            raise ValueError(
                f"from_mha needs an MHA layout (n_kv_heads == n_heads), got n_heads="
                f"{mha.n_heads}, n_kv_heads={mha.n_kv_heads}"
            )
        check_positive(n_kv_heads=n_kv_heads)
        check_divides(mha.n_heads, n_kv_heads, "n_heads", "n_kv_heads")
        gqa = GroupedQueryAttention(
            mha.d_model, mha.n_heads, mha.head_dim, n_kv_heads=n_kv_heads, bias=mha.has_bias
        )
        gqa.to(device=mha.q_proj.weight.device, dtype=mha.q_proj.weight.dtype)
        with torch.no_grad():
            gqa.q_proj.load_state_dict(mha.q_proj.state_dict())
            for name in ("k_proj", "v_proj"):
                source, target = getattr(mha, name), getattr(gqa, name)
                for param in ("weight", "bias") if mha.has_bias else ("weight",):
                    pooled = mean_pool_heads(getattr(source, param), mha.n_heads, n_kv_heads)
                    getattr(target, param).copy_(pooled)
        return gqa


def mean_pool_heads(weight: Tensor, n_heads: int, n_groups: int) -> Tensor:
    """Mean-pool ``n_heads`` head blocks of a projection weight ``[H*D, C]`` (or bias
    ``[H*D]``) into ``n_groups`` blocks ``[G*D, ...]``: block ``g`` is the mean of heads
    ``g*H/G .. (g+1)*H/G - 1`` (the GQA paper's checkpoint conversion, Ainslie et al., 2023)."""
    check_divides(n_heads, n_groups, "n_heads", "n_groups")
    blocks = weight.unflatten(0, (n_groups, n_heads // n_groups, -1))
    return blocks.mean(dim=1).flatten(0, 1)


class MultiHeadAttention(GroupedQueryAttention):
    """MHA (Vaswani et al., 2017, "Attention Is All You Need"): GQA with one key/value head
    per query head; ``[B, T, C] -> [B, T, Hq, D]``."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
    ):
        if n_kv_heads not in (None, n_heads):
            raise ValueError(
                f"mha has one key/value head per query head: n_kv_heads must be None or "
                f"n_heads={n_heads}, got {n_kv_heads}; use layout 'gqa' for fewer KV heads"
            )
        super().__init__(d_model, n_heads, head_dim, n_kv_heads=n_heads, bias=bias)


class MultiQueryAttention(GroupedQueryAttention):
    """MQA (Shazeer, 2019, "Fast Transformer Decoding: One Write-Head is All You Need"): GQA
    with a single key/value head; ``[B, T, C] -> [B, T, Hq, D]``."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
    ):
        if n_kv_heads not in (None, 1):
            raise ValueError(
                f"mqa has a single key/value head: n_kv_heads must be None or 1, got "
                f"{n_kv_heads}; use layout 'gqa' for more KV heads"
            )
        super().__init__(d_model, n_heads, head_dim, n_kv_heads=1, bias=bias)


def gqa_reference(
    x: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
    v_bias: Tensor | None = None,
    rotary: Rotary | None = None,
    positions: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """GQA written head by head, as in Ainslie et al. (2023): ``[B, T, Hq, D]``.

    For query head ``h`` in group ``g = h // (Hq / Hkv)``:
    ``o_h = softmax(rope(x Wq_h^T) rope(x Wk_g^T)^T / sqrt(D)) x Wv_g^T``
    (causal softmax when ``causal``).
    """
    D = q_weight.shape[0] // n_heads
    positions = default_positions(x, positions)

    def head(weight: Tensor, bias: Tensor | None, i: int) -> Tensor:
        rows = slice(i * D, (i + 1) * D)
        return x @ weight[rows].T + (0 if bias is None else bias[rows])

    def rope(t: Tensor) -> Tensor:
        return rotate(rotary, t.unsqueeze(2), positions).squeeze(2)

    outputs = []
    for h in range(n_heads):
        g = h // (n_heads // n_kv_heads)
        q = rope(head(q_weight, q_bias, h))
        k = rope(head(k_weight, k_bias, g))
        v = head(v_weight, v_bias, g)
        outputs.append(softmax_head(q, k, v, causal))
    return torch.stack(outputs, dim=2)
