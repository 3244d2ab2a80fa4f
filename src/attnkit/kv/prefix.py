"""Prefix sharing: requests with a common prompt prefix share its KV chunks.

ChunkAttention ("ChunkAttention: Efficient Self-Attention with Prefix-Aware KV Cache and
Two-Phase Partition", Ye, Tao, Huang, Li, 2024) stores the KV cache as a prefix tree
of fixed-size chunks: requests whose prompts start with the same tokens point at the same chunk
objects (no copy), and a decoding step runs in two phases:

1. chunk-first: for every chunk shared by several requests, the queries of all of them attend
   to it in one call (one pass over the chunk's keys for the whole group);
2. sequence-first: each request attends to its private chunks;

and each request's partial results merge exactly with the LSE merge (``attnkit.merge_all``).
The result equals attention over the request's whole, unshared cache.

    tree = PrefixTree(chunk_size=64)
    a = tree.insert(tokens_a, keys_a, values_a)      # per-layer keys [T, Hkv, D]
    b = tree.insert(tokens_b, keys_b, values_b)      # shares a's full chunks of the common prefix
    out = prefix_attention(layer, q, [a, b])         # q [2, Tq, Hq, D]

Keys are stored already rotated (RoPE): a shared prefix sits at the same positions in every
request, so its rotated keys are identical and sharing them is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnkit import masks
from attnkit.api import attention
from attnkit.call import Aux
from attnkit.merge import merge_all


@dataclass(eq=False)
class Chunk:
    """Up to ``chunk_size`` consecutive tokens and their keys/values in every layer
    (``keys[layer]`` ``[n, Hkv, D]``). Chunks are shared by identity."""

    tokens: tuple[int, ...]
    keys: list[Tensor]
    values: list[Tensor]
    children: dict[tuple[int, ...], Chunk] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Request:
    """One request: the chunks of its tokens, root to leaf (shared ones first)."""

    chunks: list[Chunk]

    @property
    def length(self) -> int:
        return sum(len(c) for c in self.chunks)


class PrefixTree:
    """A prefix tree of KV chunks (ChunkAttention's prefix-aware KV cache).

    ``insert`` splits a request into chunks of ``chunk_size`` tokens and walks the tree: a full
    chunk whose tokens (and whole prefix) are already stored is reused, the rest are stored
    (views of the given tensors are cloned, so a chunk owns exactly its bytes). A partial last
    chunk is private to its request (another request's different continuation would need a
    different chunk). ``nbytes()`` counts each stored chunk once.
    """

    def __init__(self, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.root = Chunk((), [], [])

    def insert(
        self, tokens: Sequence[int], keys: Sequence[Tensor], values: Sequence[Tensor]
    ) -> Request:
        """Store a request's prompt: ``tokens`` (length ``T``), per-layer ``keys[layer]``
        ``[T, Hkv, D]`` and ``values[layer]`` ``[T, Hkv, Dv]`` (rotated keys). Returns the
        request's chunk path. Keys of chunks already in the tree are not stored again."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("cannot insert an empty request")
        if len(keys) != len(values) or not keys:
            raise ValueError("give one keys and one values tensor per layer (same count)")
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            if k.dim() != 3 or k.shape[0] != len(tokens) or v.shape[:2] != k.shape[:2]:
                raise ValueError(
                    f"layer {layer}: keys {tuple(k.shape)} / values {tuple(v.shape)} must be "
                    f"[T={len(tokens)}, Hkv, D]"
                )
        node, path = self.root, []
        for start in range(0, len(tokens), self.chunk_size):
            piece = tuple(tokens[start : start + self.chunk_size])
            full = len(piece) == self.chunk_size
            child = node.children.get(piece) if full else None
            if child is None:
                end = start + len(piece)
                child = Chunk(
                    piece,
                    [k[start:end].clone() for k in keys],
                    [v[start:end].clone() for v in values],
                )
                if full:
                    node.children[piece] = child
            path.append(child)
            node = child
        return Request(path)

    def shared_tokens(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` are already stored as full chunks (a new
        request needs keys only for the rest)."""
        node, count = self.root, 0
        for start in range(0, len(tokens), self.chunk_size):
            piece = tuple(int(t) for t in tokens[start : start + self.chunk_size])
            node = node.children.get(piece)
            if node is None:
                break
            count += len(piece)
        return count

    def chunks(self) -> list[Chunk]:
        """Every full chunk stored in the tree (partial leaves belong to their requests)."""
        found, stack = [], list(self.root.children.values())
        while stack:
            chunk = stack.pop()
            found.append(chunk)
            stack.extend(chunk.children.values())
        return found


def nbytes(sequences: Sequence[Request]) -> int:
    """Bytes of keys and values held by ``sequences``, each distinct chunk counted once."""
    distinct = {id(c): c for s in sequences for c in s.chunks}
    return sum(
        t.numel() * t.element_size() for c in distinct.values() for t in (*c.keys, *c.values)
    )


def prefix_attention(
    layer: int,
    q: Tensor,
    sequences: Sequence[Request],
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """ChunkAttention's two-phase attention of ``q [n, Tq, Hq, D]`` (request ``i``'s queries in
    row ``i``) over each request's chunks in ``layer``. Returns ``[n, Tq, Hq, Dv]``.

    Every query sees all of its request's keys (decoding: the step's own keys are already in
    its last chunk); with ``causal``, query ``t`` sees keys up to ``length - Tq + t``, which must
    lie in the request's private chunks. Equals ``attnkit.attention`` over each request's keys
    concatenated.
    """
    n, Tq = q.shape[0], q.shape[1]
    if n != len(sequences):
        raise ValueError(f"q has {n} rows but {len(sequences)} sequences were given")
    users: dict[int, list[int]] = {}
    chunk_of: dict[int, Chunk] = {}
    for i, s in enumerate(sequences):
        for c in s.chunks:
            users.setdefault(id(c), []).append(i)
            chunk_of[id(c)] = c
    pieces: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(n)]
    options = dict(scale=scale, backend=backend, aux=Aux(lse=True))
    # phase 1, chunk-first: one call per shared chunk, the queries of all its users stacked
    for key, rows in users.items():
        if len(rows) < 2:
            continue
        chunk = chunk_of[key]
        stacked = q[rows].reshape(1, len(rows) * Tq, *q.shape[2:])
        out, aux = attention(
            stacked, chunk.keys[layer].unsqueeze(0), chunk.values[layer].unsqueeze(0), **options
        )
        out = out.view(len(rows), Tq, *out.shape[2:])
        lse = aux.lse.view(len(rows), Tq, -1)
        for j, i in enumerate(rows):
            pieces[i].append((out[j : j + 1], lse[j : j + 1]))
    # phase 2, sequence-first: each request's private chunks in one call
    for i, s in enumerate(sequences):
        private = [c for c in s.chunks if len(users[id(c)]) == 1]
        if not private:
            if causal and Tq > 1:
                raise ValueError("causal queries need their own keys in private chunks")
            continue
        k = torch.cat([c.keys[layer] for c in private]).unsqueeze(0)
        v = torch.cat([c.values[layer] for c in private]).unsqueeze(0)
        if causal and Tq > k.shape[1]:
            raise ValueError(
                f"request {i}: {Tq} causal queries but only {k.shape[1]} private keys; the "
                "queries' own keys must be in the request's private chunks"
            )
        mask = masks.causal() if causal and Tq > 1 else None
        out, aux = attention(q[i : i + 1], k, v, mask=mask, **options)
        pieces[i].append((out, aux.lse))
    rows = [merge_all([o for o, _ in p], [lse for _, lse in p])[0] for p in pieces]
    return torch.cat(rows).to(q.dtype)
