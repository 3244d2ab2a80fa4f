"""MLA: multi-head latent attention with a low-rank joint KV latent and decoupled RoPE.

"DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model"
(DeepSeek-AI, 2024), §2.1. For token ``t``:

    c_t   = W_DKV x_t                                   the cached latent, ``kv_rank`` wide
    k_h   = [W_UK_h c_t ; rope(W_KR x_t)_{r(h)}]        per-head "nope" key + shared rope key
    v_h   = W_UV_h c_t
    q_h   = [W_UQ_h c'_t ; rope(W_QR_h c'_t)]           c'_t = W_DQ x_t (or x_t without q_rank)
    o_h   = softmax(q_h k_h^T / sqrt(d_nope + d_rope)) v_h

``rope_heads`` generalises DeepSeek's single shared rope key: rope key ``r`` serves query heads
``h`` with ``h // (Hq / rope_heads) = r`` (TransMLA uses one per GQA group).

Two forms, exactly equal:
- ``forward`` (naive): materialises per-head keys and values and calls ``attend`` — for
  training and prefill. A cache wrapped around ``attend`` would store per-head k/v.
- ``decode`` (absorbed): never forms per-head keys. Since ``q_nope_h . (W_UK_h c) =
  (W_UK_h^T q_nope_h) . c``, the query absorbs ``W_UK`` and attends over ``[c ; k_rope]``
  with the latent itself as values; ``W_UV_h`` is applied to the attended latent afterwards
  (it can be folded into ``o_proj``). The explicit ``MLACache`` holds ``c`` and the rotated
  rope keys: ``kv_rank + rope_heads * d_rope`` numbers per token.

Weights follow Hugging Face ``DeepseekV2Attention``: ``q_proj`` (or ``q_a_proj``,
``q_a_layernorm``, ``q_b_proj``), ``kv_a_proj_with_mqa`` (latent rows, then rope-key rows),
``kv_a_layernorm``, ``kv_b_proj`` (per head: ``d_nope`` key rows, then ``d_v`` value rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
from attnkit.primitives import expand_kv_heads


@dataclass(frozen=True)
class MLACache:
    """The absorbed MLA form's KV cache (DeepSeek-V2, 2024): ``latent [B, T, kv_rank]`` and
    the rotated rope keys ``k_rope [B, T, rope_heads, rope_dim]``."""

    latent: Tensor
    k_rope: Tensor

    @property
    def length(self) -> int:
        """Tokens cached."""
        return self.latent.shape[1]

    def append(self, latent: Tensor, k_rope: Tensor) -> MLACache:
        """A cache with this step's ``latent``/``k_rope`` appended along tokens."""
        return MLACache(
            torch.cat([self.latent, latent], dim=1), torch.cat([self.k_rope, k_rope], dim=1)
        )


class MultiHeadLatentAttention(HeadLayout):
    """MLA heads (DeepSeek-AI, 2024, "DeepSeek-V2: A Strong, Economical, and Efficient
    Mixture-of-Experts Language Model"): ``forward(x [B, T, C], attend, rotary, positions) ->
    [B, T, Hq, Dv]``; ``decode`` is the absorbed form over an explicit ``MLACache``.

    Args:
        d_model: input width ``C``.
        n_heads: query heads ``Hq``.
        head_dim: default for ``nope_dim`` and ``value_dim`` (DeepSeek-V2: 128).
        kv_rank: latent width ``d_c``; None = ``4 * head_dim`` (DeepSeek-V2: 512).
        rope_dim: decoupled RoPE width ``d_R`` per head (even); None = ``head_dim // 2``.
        nope_dim: per-head key/query width without RoPE; None = ``head_dim`` (0 allowed).
        value_dim: per-head value width ``Dv``; None = ``head_dim``.
        q_rank: query latent width ``d_c'``; None = no query compression.
        rope_heads: rope keys, each shared by ``Hq / rope_heads`` query heads (DeepSeek: 1).
        n_kv_heads: MLA has no KV heads; accepted only as None or ``n_heads`` (a layer's
            default), anything else is refused.
        bias: biases on the input projections (``q_proj``/``q_a_proj``,
            ``kv_a_proj_with_mqa``).
        latent_norm: RMSNorm on the latents, as in the released DeepSeek-V2 checkpoints.
        norm_eps: the RMSNorms' epsilon.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        kv_rank: int | None = None,
        rope_dim: int | None = None,
        nope_dim: int | None = None,
        value_dim: int | None = None,
        q_rank: int | None = None,
        rope_heads: int = 1,
        n_kv_heads: int | None = None,
        bias: bool = False,
        latent_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        check_positive(d_model=d_model, n_heads=n_heads, head_dim=head_dim)
        if n_kv_heads not in (None, n_heads):
            raise ValueError(
                f"MLA has no key/value heads (its cache is the kv_rank latent): n_kv_heads "
                f"must be None or n_heads={n_heads}, got {n_kv_heads}"
            )
        kv_rank = 4 * head_dim if kv_rank is None else kv_rank
        rope_dim = head_dim // 2 if rope_dim is None else rope_dim
        nope_dim = head_dim if nope_dim is None else nope_dim
        value_dim = head_dim if value_dim is None else value_dim
        check_positive(
            kv_rank=kv_rank, rope_dim=rope_dim, value_dim=value_dim, rope_heads=rope_heads
        )
        if q_rank is not None:
            check_positive(q_rank=q_rank)
        if not (isinstance(nope_dim, int) and nope_dim >= 0):
            raise ValueError(f"nope_dim must be an int >= 0, got {nope_dim!r}")
        if rope_dim % 2:
            raise ValueError(f"rope_dim must be even (RoPE rotates pairs), got {rope_dim}")
        check_divides(n_heads, rope_heads, "n_heads", "rope_heads")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.kv_rank, self.q_rank, self.rope_heads = kv_rank, q_rank, rope_heads
        self.nope_dim, self.value_dim = nope_dim, value_dim
        self.rope_dim = self.rotary_dim = rope_dim
        self.has_bias, self.latent_norm = bias, latent_norm
        qk_dim = nope_dim + rope_dim

        def norm(width: int) -> nn.Module:
            return nn.RMSNorm(width, eps=norm_eps) if latent_norm else nn.Identity()

        if q_rank is None:
            self.q_proj = nn.Linear(d_model, n_heads * qk_dim, bias=bias)
        else:
            self.q_a_proj = nn.Linear(d_model, q_rank, bias=bias)
            self.q_a_layernorm = norm(q_rank)
            self.q_b_proj = nn.Linear(q_rank, n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, kv_rank + rope_heads * rope_dim, bias=bias)
        self.kv_a_layernorm = norm(kv_rank)
        self.kv_b_proj = nn.Linear(kv_rank, n_heads * (nope_dim + value_dim), bias=False)

    # -- the parts both forms share --------------------------------------------------------
    def queries(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Un-rotated ``q_nope [B, T, Hq, d_nope]`` and ``q_rope [B, T, Hq, d_R]``."""
        if self.q_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return split_heads(q, self.n_heads).split([self.nope_dim, self.rope_dim], dim=-1)

    def latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The latent ``c [B, T, kv_rank]`` and the un-rotated rope keys
        ``[B, T, rope_heads, d_R]``."""
        c, k_rope = self.kv_a_proj_with_mqa(x).split(
            [self.kv_rank, self.rope_heads * self.rope_dim], dim=-1
        )
        return self.kv_a_layernorm(c), split_heads(k_rope, self.rope_heads)

    def up_projections(self) -> tuple[Tensor, Tensor]:
        """``W_UK [Hq, d_nope, kv_rank]`` and ``W_UV [Hq, Dv, kv_rank]`` (views of
        ``kv_b_proj.weight``)."""
        w = self.kv_b_proj.weight.unflatten(0, (self.n_heads, -1))
        return w.split([self.nope_dim, self.value_dim], dim=1)

    @property
    def softmax_scale(self) -> float:
        """``1 / sqrt(d_nope + d_R)``, the scale of both forms unless ``attend`` sets one."""
        return 1.0 / math.sqrt(self.nope_dim + self.rope_dim)

    # -- the naive form ----------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        attend: Attend,
        rotary: Rotary | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        self.check_input(x)
        positions = default_positions(x, positions)
        q_nope, q_rope = self.queries(x)
        c, k_rope = self.latent(x)
        k_nope, v = split_heads(self.kv_b_proj(c), self.n_heads).split(
            [self.nope_dim, self.value_dim], dim=-1
        )
        k_rope = rotate(rotary, k_rope, positions)
        k_rope = expand_kv_heads(k_rope, self.n_heads // self.rope_heads, dim=2)
        q = torch.cat([q_nope, rotate(rotary, q_rope, positions)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        return attend(q, k, v)

    # -- the absorbed form -------------------------------------------------------------------
    def decode(
        self,
        x: Tensor,
        cache: MLACache | None,
        attend: Attend,
        rotary: Rotary | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, MLACache]:
        """The absorbed form: ``x [B, T, C]`` (new tokens) and the latent cache of the tokens
        before them -> ``(heads [B, T, Hq, Dv], cache with these tokens appended)``.

        ``positions`` default to ``cache.length + arange(T)``. Queries are bottom-right aligned
        with the cache (``masks.causal()`` gives causal decoding and chunked prefill). Equals
        ``forward`` over the whole sequence. ``attend`` must be a plain ``Attend``: the cache
        here is the only one.
        """
        self.check_input(x)
        attend = self.check_plain_attend(attend)
        past = 0 if cache is None else cache.length
        positions = default_positions(x, positions, start=past)
        c, k_rope = self.latent(x)
        k_rope = rotate(rotary, k_rope, positions)
        cache = MLACache(c, k_rope) if cache is None else cache.append(c, k_rope)
        w_uk, w_uv = self.up_projections()
        q_nope, q_rope = self.queries(x)
        q = torch.cat(
            [torch.einsum("bthn,hnr->bthr", q_nope, w_uk), rotate(rotary, q_rope, positions)],
            dim=-1,
        )
        latent = cache.latent.unsqueeze(2).expand(-1, -1, self.rope_heads, -1)
        k = torch.cat([latent, cache.k_rope], dim=-1)
        scale = self.softmax_scale if attend.scale is None else attend.scale
        attended = attend.with_options(scale=scale)(q, k, latent)
        return torch.einsum("bthr,hvr->bthv", attended, w_uv), cache

    def kv_cache_dims(self) -> dict[str, int]:
        """The absorbed form's cache: ``{"latent": kv_rank, "k_rope": rope_heads * d_R}``
        (DeepSeek-V2: 512 + 64). ``forward`` through a cache-wrapped ``attend`` would instead
        store per-head keys and values, ``Hq * (d_nope + d_R + Dv)``."""
        return {"latent": self.kv_rank, "k_rope": self.rope_heads * self.rope_dim}


def mla_reference(
    x: Tensor,
    kv_a_weight: Tensor,
    kv_b_weight: Tensor,
    *,
    n_heads: int,
    kv_rank: int,
    nope_dim: int,
    rope_dim: int,
    value_dim: int,
    rope_heads: int = 1,
    q_weight: Tensor | None = None,
    q_a_weight: Tensor | None = None,
    q_b_weight: Tensor | None = None,
    q_bias: Tensor | None = None,
    kv_a_bias: Tensor | None = None,
    rotary: Rotary | None = None,
    positions: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """MLA written as DeepSeek-V2's equations (§2.1.2-2.1.3), head by head: ``[B, T, Hq, Dv]``.

    Weights in the ``MultiHeadLatentAttention`` layout: ``kv_a_weight`` stacks ``W_DKV`` and
    ``W_KR``; ``kv_b_weight`` stacks ``W_UK_h``, ``W_UV_h`` per head; queries come from
    ``q_weight`` (``[W_UQ_h ; W_QR_h]`` per head) or from ``q_a_weight`` (``W_DQ``) and
    ``q_b_weight``. No latent norms.
    """
    positions = default_positions(x, positions)
    qk_dim = nope_dim + rope_dim
    W_DKV, W_KR = kv_a_weight[:kv_rank], kv_a_weight[kv_rank:]
    b_DKV = None if kv_a_bias is None else kv_a_bias[:kv_rank]
    b_KR = None if kv_a_bias is None else kv_a_bias[kv_rank:]

    def linear(inp: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return inp @ weight.T + (0 if bias is None else bias)

    def rope(t: Tensor) -> Tensor:
        return rotate(rotary, t.unsqueeze(2), positions).squeeze(2)

    c_KV = linear(x, W_DKV, b_DKV)
    k_R = linear(x, W_KR, b_KR)  # before RoPE; one block of rope_dim per rope head
    if q_weight is not None:
        q_source, W_Q = linear(x, q_weight, q_bias), None
    else:
        q_source, W_Q = linear(x, q_a_weight, q_bias), q_b_weight  # c_Q = W_DQ x
    outputs = []
    for h in range(n_heads):
        block = kv_b_weight[h * (nope_dim + value_dim) : (h + 1) * (nope_dim + value_dim)]
        W_UK_h, W_UV_h = block[:nope_dim], block[nope_dim:]
        k_C = c_KV @ W_UK_h.T
        v_C = c_KV @ W_UV_h.T
        r = h // (n_heads // rope_heads)
        k_Rr = rope(k_R[..., r * rope_dim : (r + 1) * rope_dim])
        q_h = (
            q_source[..., h * qk_dim : (h + 1) * qk_dim]
            if W_Q is None
            else (q_source @ W_Q[h * qk_dim : (h + 1) * qk_dim].T)
        )
        q_C, q_R = q_h[..., :nope_dim], rope(q_h[..., nope_dim:])
        q = torch.cat([q_C, q_R], dim=-1)
        k = torch.cat([k_C, k_Rr], dim=-1)
        outputs.append(softmax_head(q, k, v_C, causal, scale=1.0 / math.sqrt(qk_dim)))
    return torch.stack(outputs, dim=2)
