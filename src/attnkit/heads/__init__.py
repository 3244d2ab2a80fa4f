"""Head layouts: how an attention layer projects ``x`` into heads and how heads share or mix
keys, values, scores and outputs.

Every layout is an ``nn.Module`` with ``forward(x [B, T, C], attend, rotary=None,
positions=None) -> [B, T, Hq, Dv]`` (``attnkit.heads.base``); ``attnkit.nn.Attention`` applies
the output gate and ``o_proj``. Build one by name:

    layout = LAYOUTS["gqa"](d_model=512, n_heads=8, head_dim=64, n_kv_heads=2)
    heads = layout(x, Attend(mask=masks.causal()), rotary, positions)

Conversions: ``GroupedQueryAttention.from_mha`` (GQA uptraining init), ``mla_from_gqa``
(TransMLA), ``KnockingHeadsAttention.absorbed``. MLA's absorbed decoding form with a latent
cache: ``MultiHeadLatentAttention.decode``.
"""

from attnkit.heads.base import HeadLayout
from attnkit.heads.dcmha import DynamicallyComposableMHA, dcmha_reference
from attnkit.heads.gqa import (
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    gqa_reference,
    mean_pool_heads,
)
from attnkit.heads.kdgqa import (
    DynamicKeyDrivenGQA,
    KeyDrivenGQA,
    allocate_query_heads,
    kdgqa_reference,
)
from attnkit.heads.knocking import KnockingHeadsAttention, knocking_heads_reference
from attnkit.heads.mla import MLACache, MultiHeadLatentAttention, mla_reference
from attnkit.heads.moh import MixtureOfHeadsAttention, moh_reference
from attnkit.heads.talking import TalkingHeadsAttention, talking_heads_reference
from attnkit.heads.transmla import mla_from_gqa

#: Layout name -> class; ``LAYOUTS[name](d_model=..., n_heads=..., head_dim=..., **options)``.
LAYOUTS: dict[str, type[HeadLayout]] = {
    "mha": MultiHeadAttention,
    "gqa": GroupedQueryAttention,
    "mqa": MultiQueryAttention,
    "mla": MultiHeadLatentAttention,
    "moh": MixtureOfHeadsAttention,
    "kdgqa": KeyDrivenGQA,
    "dgqa": DynamicKeyDrivenGQA,
    "dcmha": DynamicallyComposableMHA,
    "knocking_heads": KnockingHeadsAttention,
    "talking_heads": TalkingHeadsAttention,
}

__all__ = [
    "LAYOUTS",
    "DynamicKeyDrivenGQA",
    "DynamicallyComposableMHA",
    "GroupedQueryAttention",
    "HeadLayout",
    "KeyDrivenGQA",
    "KnockingHeadsAttention",
    "MLACache",
    "MixtureOfHeadsAttention",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "MultiQueryAttention",
    "TalkingHeadsAttention",
    "allocate_query_heads",
    "dcmha_reference",
    "gqa_reference",
    "kdgqa_reference",
    "knocking_heads_reference",
    "mean_pool_heads",
    "mla_from_gqa",
    "mla_reference",
    "moh_reference",
    "talking_heads_reference",
]
