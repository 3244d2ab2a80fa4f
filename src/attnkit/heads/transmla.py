"""TransMLA: any GQA layer is an MLA layer with the same outputs and the same KV cache.

"TransMLA: Multi-Head Latent Attention Is All You Need" (Meng, Tang, Tang, Yao, Sun, Zhang,
2025). The paper shows that GQA can always be written as MLA with the same KV-cache size (but
not the converse), so a pretrained GQA model can be converted and then trained further with
MLA's extra expressiveness at no cache cost. The exact construction used here, which holds
under RoPE:

- keys: the ``Hkv`` rotated GQA keys become MLA's decoupled rope keys — ``rope_heads = Hkv``,
  ``rope_dim = D``, ``nope_dim = 0``; query head ``h``'s rope query is its GQA query, and rope
  key ``h // (Hq / Hkv)`` is its group's key (MLA's rope-head sharing is GQA's grouping), so
  every score is the GQA score ``q_h . k_g / sqrt(D)``.
- values: the latent is the ``Hkv`` concatenated GQA value heads (``kv_rank = Hkv * D``,
  ``W_DKV = Wv``); ``W_UV_h`` is the fixed copy that picks group ``g(h)``'s block — identity
  on that block, zero elsewhere — and becomes a trainable up-projection after conversion.
- cache: latent ``Hkv * D`` + rope keys ``Hkv * D`` = GQA's ``2 * Hkv * D`` per token.

Both MLA forms apply: the absorbed ``decode`` reproduces GQA decoding exactly too (with
``nope_dim = 0`` the absorbed query's latent part is zero and the rope part carries the score).

Not implemented: TransMLA's later steps that shrink the cache and reach DeepSeek's format —
RoRoPE (a PCA rotation across the key heads, per RoPE frequency pair, that concentrates the
positional information into one shared rope head so the other key dimensions become NoPE and
join the latent), FreqFold (merging similar neighbouring frequencies before that PCA), and the
balanced key-value joint PCA that compresses the latent to DeepSeek's 512 dims after
equalising the K and V norms, followed by fine-tuning. Those steps are approximations (the
paper reports 93% cache compression on LLaMA-2-7B with fine-tuning to recover quality); the
conversion here is exact and keeps the cache size.
"""

from __future__ import annotations

import torch

from attnkit.heads.gqa import GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention
from attnkit.heads.mla import MultiHeadLatentAttention

#: The layouts ``mla_from_gqa`` converts exactly.
PLAIN_LAYOUTS = (GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention)


def mla_from_gqa(gqa: GroupedQueryAttention) -> MultiHeadLatentAttention:
    """The MLA layout equal to ``gqa`` (module docstring): same outputs, same KV-cache size.

    ``gqa [Hq, Hkv, D]`` -> ``MultiHeadLatentAttention(kv_rank=Hkv*D, rope_dim=D, nope_dim=0,
    value_dim=D, rope_heads=Hkv)`` with ``q_proj = gqa.q_proj``, ``kv_a_proj_with_mqa =
    [gqa.v_proj ; gqa.k_proj]`` and ``kv_b_proj`` the group-to-head copy. Use the same
    ``rotary`` (built for ``D`` dims) with both.
    """
    if type(gqa) not in PLAIN_LAYOUTS:
        raise TypeError(
            f"mla_from_gqa converts plain MHA/GQA/MQA layouts, got {type(gqa).__name__} "
            "(a variant that changes how heads are computed has no exact MLA form here; for "
            "linear knocking heads, convert KnockingHeadsAttention.absorbed())"
        )
    Hq, Hkv, D = gqa.n_heads, gqa.n_kv_heads, gqa.head_dim
    weight = gqa.q_proj.weight
    mla = MultiHeadLatentAttention(
        gqa.d_model,
        Hq,
        D,
        kv_rank=Hkv * D,
        rope_dim=D,
        nope_dim=0,
        value_dim=D,
        rope_heads=Hkv,
        bias=gqa.has_bias,
    ).to(device=weight.device, dtype=weight.dtype)
    copy = torch.zeros(Hq, D, Hkv, D, dtype=weight.dtype, device=weight.device)
    for h in range(Hq):
        copy[h, :, h // gqa.groups] = torch.eye(D, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        mla.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mla.kv_a_proj_with_mqa.weight.copy_(torch.cat([gqa.v_proj.weight, gqa.k_proj.weight]))
        if gqa.has_bias:
            mla.kv_a_proj_with_mqa.bias.copy_(torch.cat([gqa.v_proj.bias, gqa.k_proj.bias]))
        mla.kv_b_proj.weight.copy_(copy.reshape(Hq * D, Hkv * D))
    return mla
