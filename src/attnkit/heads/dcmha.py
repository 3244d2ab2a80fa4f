"""DCMHA: dynamically composable multi-head attention — input-dependent cross-head mixing.

"Improving Transformers with Dynamically Composable Multi-Head Attention" (Xiao, Meng, Li,
Yuan, 2024). The ``Compose`` function mixes the vector of all heads' attention values
``A_ij [H]`` (query ``i``, key ``j``) once on the scores (before the softmax) and once on the
weights (after it), each with five branches:

    A'_ij = A_ij W_b                                            static composition [H, H]
          + (A_ij w_q1(i)^T) w_q2(i)  + (A_ij w_k1(j)^T) w_k2(j)   dynamic low-rank (rank R)
          + A_ij * g_q(i)             + A_ij * g_k(j)             dynamic per-head gates

with the dynamic weights generated from the layer input at the query position ``x_i`` and the
key position ``x_j`` (the authors' code):

    [w_1 ; w_2] = GELU(x W_in) W_out,   w_1 <- w_1 / rms_over_heads(w_1),   g = tanh(x W_g)

one generator per (stage, side) for stages {scores, weights} and sides {query, key}.
Initialisation: ``W_b = I``, ``W_out = 0`` and ``W_g = 0`` (so every dynamic term is exactly 0
and gradients still reach ``W_out``), ``W_in`` random.

Exact reduction: zero dynamic terms and identity ``W_b`` (the initialisation) give MHA/GQA with
the same weights. DCMHA needs every head's full score matrix, so it runs densely
(``attnkit.heads.dense``) with the ``Attend``'s mask, score function, bias and scale, and needs
a plain ``Attend`` (a KV cache would also have to keep the key-side dynamic weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.attend import Attend
from attnkit.heads.base import Rotary, check_positive, default_positions, rotate
from attnkit.heads.dense import Compose, dense_attend
from attnkit.heads.gqa import GroupedQueryAttention
from attnkit.primitives import expand_kv_heads

#: The four dynamic-weight generators: (stage, side) in the order of the parameters' first dim.
GENERATORS = (("scores", "query"), ("scores", "key"), ("weights", "query"), ("weights", "key"))
STAGES = ("scores", "weights")


def rms_normalize(w: Tensor, eps: float = 1e-6) -> Tensor:
    """``w / sqrt(mean(w^2) + eps)`` over the last dim (no learned scale)."""
    return w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + eps)


def dynamic_weights(
    x: Tensor, dynamic_in: Tensor, dynamic_out: Tensor, gate_proj: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """DCMHA's generated weights (Xiao et al., 2024) for ``x [B, T, C]``: ``w1``, ``w2``
    ``[B, T, 4, R, H]`` (``w1`` RMS-normalised over heads) and gates ``[B, T, 4, H]``, indexed
    by ``GENERATORS``.

    ``dynamic_in [4, C, K]``, ``dynamic_out [4, K, 2, R, H]``, ``gate_proj [4, C, H]``.
    """
    hidden = F.gelu(torch.einsum("btc,sck->btsk", x, dynamic_in))
    w = torch.einsum("btsk,sklrh->btslrh", hidden, dynamic_out)
    gates = torch.tanh(torch.einsum("btc,sch->btsh", x, gate_proj))
    return rms_normalize(w[:, :, :, 0]), w[:, :, :, 1], gates


class DynamicallyComposableMHA(GroupedQueryAttention):
    """DCMHA (Xiao et al., 2024, "Improving Transformers with Dynamically Composable
    Multi-Head Attention") on GQA projections: ``[B, T, C] -> [B, T, Hq, D]``.

    Args:
        d_model, n_heads, head_dim, n_kv_heads, bias: as ``GroupedQueryAttention``.
        rank: ``R`` of the dynamic low-rank terms (the paper's code: 2).
        dynamic_hidden: hidden width ``K`` of the weight generators; None = ``4 * Hq``.
    Parameters: ``static_mix [2, Hq, Hq]`` (``W_b`` for scores, weights), ``dynamic_in
    [4, C, K]``, ``dynamic_out [4, K, 2, R, Hq]``, ``gate_proj [4, C, Hq]`` (``GENERATORS``).
    """

    supports_kv_cache = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
        rank: int = 2,
        dynamic_hidden: int | None = None,
    ):
        super().__init__(d_model, n_heads, head_dim, n_kv_heads=n_kv_heads, bias=bias)
        dynamic_hidden = 4 * n_heads if dynamic_hidden is None else dynamic_hidden
        check_positive(rank=rank, dynamic_hidden=dynamic_hidden)
        self.rank, self.dynamic_hidden = rank, dynamic_hidden
        G = len(GENERATORS)
        self.static_mix = nn.Parameter(torch.eye(n_heads).repeat(len(STAGES), 1, 1))
        self.dynamic_in = nn.Parameter(torch.randn(G, d_model, dynamic_hidden) / math.sqrt(d_model))
        self.dynamic_out = nn.Parameter(torch.zeros(G, dynamic_hidden, 2, rank, n_heads))
        self.gate_proj = nn.Parameter(torch.zeros(G, d_model, n_heads))

    def forward(
        self,
        x: Tensor,
        attend: Attend,
        rotary: Rotary | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        attend = self.check_plain_attend(attend)
        q, k, v = self.qkv(x, rotary, positions)
        w1, w2, gates = dynamic_weights(x, self.dynamic_in, self.dynamic_out, self.gate_proj)

        def compose(stage: int) -> Compose:
            def apply(a: Tensor) -> Tensor:
                qi, ki = 2 * stage, 2 * stage + 1
                cast = a.dtype
                out = torch.einsum("bhqk,hm->bmqk", a, self.static_mix[stage].to(cast))
                hidden = torch.einsum("bhqk,bqrh->brqk", a, w1[:, :, qi].to(cast))
                out = out + torch.einsum("brqk,bqrm->bmqk", hidden, w2[:, :, qi].to(cast))
                hidden = torch.einsum("bhqk,bkrh->brqk", a, w1[:, :, ki].to(cast))
                out = out + torch.einsum("brqk,bkrm->bmqk", hidden, w2[:, :, ki].to(cast))
                gate_q = gates[:, :, qi].transpose(1, 2).unsqueeze(-1).to(cast)  # [B, H, Tq, 1]
                gate_k = gates[:, :, ki].transpose(1, 2).unsqueeze(-2).to(cast)  # [B, H, 1, Tk]
                return out + a * gate_q + a * gate_k

            return apply

        return dense_attend(attend, q, k, v, compose_scores=compose(0), compose_weights=compose(1))

    def kv_cache_dims(self) -> dict[str, int]:
        """GQA's keys and values plus, per key, the key-side dynamic weights of both stages
        (``w_k1``, ``w_k2``: ``2 R Hq``, gate: ``Hq``) that decoding would have to keep."""
        dims = super().kv_cache_dims()
        dims["key_dynamic"] = len(STAGES) * (2 * self.rank * self.n_heads + self.n_heads)
        return dims


def dcmha_reference(
    x: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    static_mix: Tensor,
    dynamic_in: Tensor,
    dynamic_out: Tensor,
    gate_proj: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    rotary: Rotary | None = None,
    positions: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """DCMHA as the paper's Compose, with one ``[H, H]`` composition matrix per (query, key)
    pair: ``W_ij = W_b + w_q1(i)^T w_q2(i) + w_k1(j)^T w_k2(j) + diag(g_q(i)) + diag(g_k(j))``,
    applied to the scores and (with the second stage's weights) to the softmax weights.
    Returns ``[B, T, Hq, D]``."""
    B, T, _ = x.shape
    D = q_weight.shape[0] // n_heads
    positions = default_positions(x, positions)
    q = rotate(rotary, (x @ q_weight.T).view(B, T, n_heads, D), positions)
    k = rotate(rotary, (x @ k_weight.T).view(B, T, n_kv_heads, D), positions)
    v = (x @ v_weight.T).view(B, T, n_kv_heads, D)
    k = expand_kv_heads(k, n_heads // n_kv_heads, dim=2)
    v = expand_kv_heads(v, n_heads // n_kv_heads, dim=2)

    hidden = F.gelu(torch.einsum("btc,sck->btsk", x, dynamic_in))
    w = torch.einsum("btsk,sklrh->btslrh", hidden, dynamic_out)
    w1 = w[:, :, :, 0] / torch.sqrt(w[:, :, :, 0].pow(2).mean(-1, keepdim=True) + 1e-6)
    w2 = w[:, :, :, 1]
    g = torch.tanh(torch.einsum("btc,sch->btsh", x, gate_proj))

    def composition(stage: int) -> Tensor:
        """``W [B, Tq, Tk, H, H]`` for one stage."""
        qi, ki = 2 * stage, 2 * stage + 1
        low_rank_q = torch.einsum("bqrh,bqrm->bqhm", w1[:, :, qi], w2[:, :, qi])
        low_rank_k = torch.einsum("bkrh,bkrm->bkhm", w1[:, :, ki], w2[:, :, ki])
        return (
            static_mix[stage]
            + low_rank_q[:, :, None]
            + low_rank_k[:, None, :]
            + torch.diag_embed(g[:, :, qi])[:, :, None]
            + torch.diag_embed(g[:, :, ki])[:, None, :]
        )

    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    scores = torch.einsum("bhqk,bqkhm->bmqk", scores, composition(0))
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, -torch.inf)
    weights = torch.einsum("bhqk,bqkhm->bmqk", torch.softmax(scores, dim=-1), composition(1))
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)
