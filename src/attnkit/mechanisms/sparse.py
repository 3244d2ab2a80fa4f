"""Structured sparse patterns as masks. Grid patterns lay the ``Tk`` tokens
on the most nearly square grid of that many tokens (``attnkit.grid.balanced_grid``)."""

from __future__ import annotations

from typing import Any

import torch

from attnkit import masks
from attnkit.grid import balanced_grid
from attnkit.mechanisms.base import InputSpec, Mechanism, register

NAT = "Neighborhood Attention Transformer — Hassani, Walton, Li, Li, Shi (2023)"
GNA = (
    "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of "
    "Light — Hassani et al. (2025)"
)


def _clip(kernel: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(kernel, size) for size in grid)


def _dilated_2d(spec: InputSpec) -> dict[str, Any]:
    grid = balanced_grid(spec.Tk, 2)
    kernel = _clip(7, grid)
    dilation = tuple(max(1, min(4, s // k)) for s, k in zip(grid, kernel, strict=True))
    return {"mask": masks.neighborhood(kernel, grid, dilation=dilation)}


def _frames_3d(spec: InputSpec) -> dict[str, Any]:
    grid = balanced_grid(spec.Tk, 3)
    kernel = tuple(min(a, s) for a, s in zip((3, 7, 7), grid, strict=True))
    return {"mask": masks.neighborhood(kernel, grid, causal=(True, False, False))}


def _blocked_2d(spec: InputSpec) -> dict[str, Any]:
    grid = balanced_grid(spec.Tk, 2)
    kernel = _clip(16, grid)
    return {"mask": masks.neighborhood(kernel, grid, stride=kernel)}


def _halo(spec: InputSpec) -> dict[str, Any]:
    grid = balanced_grid(spec.Tk, 2)
    return {"mask": masks.halo(min(8, *grid), 3, grid)}


def _duo(spec: InputSpec) -> dict[str, Any]:
    group = spec.Hq // spec.kv_heads
    retrieval = torch.arange(spec.Hq) // group % 2 == 0
    return {"mask": masks.duo(retrieval, sinks=64, window=256)}


for _mechanism in (
    Mechanism(
        "neighborhood_1d",
        "static sparse",
        NAT,
        "1-D neighborhood attention, 255 keys per query, shifted inward at the ends",
        build=lambda spec: {"mask": masks.neighborhood(min(255, spec.Tk))},
    ),
    Mechanism(
        "neighborhood_2d",
        "static sparse",
        NAT,
        "2-D neighborhood attention 13x13 on a near-square grid of the tokens",
        build=lambda spec: {
            "mask": masks.neighborhood(
                _clip(13, balanced_grid(spec.Tk, 2)), balanced_grid(spec.Tk, 2)
            )
        },
    ),
    Mechanism(
        "dilated_neighborhood_2d",
        "static sparse",
        "Dilated Neighborhood Attention Transformer — Hassani, Shi (2022)",
        "DiNA: 2-D neighborhood 7x7 with dilation up to 4",
        build=_dilated_2d,
    ),
    Mechanism(
        "neighborhood_3d_causal_frames",
        "static sparse",
        GNA,
        "3-D neighborhood (3, 7, 7), causal over frames, on a near-cubic grid",
        build=_frames_3d,
    ),
    Mechanism(
        "gna_blocked_2d",
        "static sparse",
        GNA,
        "GNA with stride = kernel: blocked 16x16 attention on a 2-D grid",
        build=_blocked_2d,
    ),
    Mechanism(
        "halo_2d",
        "static sparse",
        "Scaling Local Self-Attention for Parameter Efficient Visual Backbones — Vaswani, "
        "Ramachandran, Srinivas, Parmar, Hechtman, Shlens (2021)",
        "HaloNet: 8x8 query blocks attend to their block plus a halo of 3",
        build=_halo,
    ),
    Mechanism(
        "dilated_window",
        "static sparse",
        "Longformer: The Long-Document Transformer — Beltagy, Peters, Cohan (2020)",
        "causal window of 128 keys at dilation 2",
        build=lambda spec: {"mask": masks.dilated_window(127, 0, dilation=2)},
    ),
    Mechanism(
        "sparse_transformer_strided",
        "static sparse",
        "Generating Long Sequences with Sparse Transformers — Child, Gray, Radford, Sutskever "
        "(2019)",
        "causal strided (every 128th key) plus a local window of 128",
        build=lambda spec: {"mask": masks.strided(128) | masks.sliding_window(127)},
    ),
    Mechanism(
        "s2_attention",
        "static sparse",
        "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads — Lin et al. (2024)",
        "per-head strided shards of 64-token blocks plus 4 local blocks",
        build=lambda spec: {
            "mask": masks.s2_attention(spec.Hq, 64, 4, 8, num_kv_heads=spec.kv_heads)
        },
    ),
    Mechanism(
        "power_attention",
        "static sparse",
        "PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse "
        "Attention — Chen et al. (2025)",
        "64-token blocks at power-of-two distances plus a sink block",
        build=lambda spec: {"mask": masks.power_attention(64, sink_blocks=1)},
    ),
    Mechanism(
        "scca",
        "static sparse",
        "SCCA: Shifted Cross Chunk Attention for long contextual semantic expansion — Guo (2023)",
        "chunks of 256; half the heads see key chunks shifted by half a chunk",
        build=lambda spec: {"mask": masks.scca(256, spec.Hq, "fixed")},
    ),
    Mechanism(
        "longlora_shift",
        "static sparse",
        "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models — Chen et al. "
        "(2024)",
        "S2-Attn: causal groups of 256, half the heads shifted by half a group",
        build=lambda spec: {"mask": masks.longlora_shift(256, spec.Hq)},
    ),
    Mechanism(
        "block_causal",
        "static sparse",
        "Inf-DiT: Upsampling Any-Resolution Image with Memory-Efficient Diffusion Transformer — "
        "Yang et al. (2024)",
        "bidirectional inside blocks of 256, causal between blocks (frames)",
        build=lambda spec: {"mask": masks.block_causal(256)},
    ),
    Mechanism(
        "chunked_local",
        "static sparse",
        "Block Transformer: Global-to-Local Language Modeling for Fast Inference — Ho et al. "
        "(2024)",
        "causal attention within the current chunk of 256 only",
        build=lambda spec: {"mask": masks.chunked(256, causal=True)},
    ),
    Mechanism(
        "longformer_global",
        "static sparse",
        "Longformer: The Long-Document Transformer — Beltagy, Peters, Cohan (2020)",
        "bidirectional window of 511 keys plus a global token 0",
        build=lambda spec: {"mask": masks.sliding_window(255, 255) | masks.global_tokens([0])},
    ),
    Mechanism(
        "moa_windows",
        "static sparse",
        "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression — Fu "
        "et al. (2024)",
        "a different causal span per head (64 to 2048 keys)",
        build=lambda spec: {
            "mask": masks.windows_per_head([64 * 2 ** (h % 6) for h in range(spec.Hq)])
        },
    ),
    Mechanism(
        "duo_attention",
        "static sparse",
        "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads "
        "— Xiao et al. (2024)",
        "retrieval heads full causal, streaming heads 64 sinks + 256 recent keys (per KV head)",
        build=_duo,
    ),
):
    register(_mechanism)
