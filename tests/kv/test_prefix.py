"""Prefix sharing (ChunkAttention): requests share prefix chunks by identity, and the two-phase
attention over shared and private chunks equals attention over each request's own cache."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks, testing
from attnkit.kv.prefix import PrefixTree, nbytes, prefix_attention

LAYERS, HQ, HKV, D = 2, 6, 2, 16


def request_kv(tokens: list[int], seed: int) -> tuple[list, list]:
    """Keys/values per layer that depend only on (layer, position, token), as a model's rotated
    keys of a shared prefix do."""
    keys, values = [], []
    for layer in range(LAYERS):
        g = torch.Generator().manual_seed(1000 * layer + seed)
        table = torch.randn(64, 200, HKV, 2 * D, generator=g)  # [position, token, Hkv, k|v]
        rows = table[torch.arange(len(tokens)), torch.tensor(tokens)]
        keys.append(rows[..., :D])
        values.append(rows[..., D:])
    return keys, values


SHARED = list(range(10, 34))  # 24 tokens: 3 chunks of 8
PROMPTS = [[*SHARED, 40, 41, 42], [*SHARED, 50, 51, 52, 53, 54], [*SHARED[:19], 60]]


def build() -> tuple[PrefixTree, list, list]:
    tree = PrefixTree(chunk_size=8)
    requests, caches = [], []
    for tokens in PROMPTS:
        keys, values = request_kv(tokens, seed=0)
        requests.append(tree.insert(tokens, keys, values))
        caches.append((keys, values))
    return tree, requests, caches


def test_shared_prefix_chunks_are_the_same_tensors() -> None:
    tree, requests, caches = build()
    a, b, c = requests
    for i in range(3):
        for layer in range(LAYERS):
            assert a.chunks[i].keys[layer].data_ptr() == b.chunks[i].keys[layer].data_ptr()
    assert a.chunks[2] is not c.chunks[2]  # c diverges inside the third chunk
    assert c.chunks[1] is a.chunks[1]
    assert tree.shared_tokens(PROMPTS[1]) == 24 and tree.shared_tokens(PROMPTS[2]) == 16
    unshared = sum(2 * k.numel() * 4 for keys, _ in caches for k in keys)
    entries = 24 + 3 + 5 + 4  # shared prefix once, then each request's own tokens
    assert nbytes(requests) == entries * LAYERS * HKV * 2 * D * 4 < unshared


@pytest.mark.parametrize("Tq", [1, 3])
def test_prefix_attention_equals_unshared_attention(Tq: int) -> None:
    _, requests, caches = build()
    q = torch.randn(3, Tq, HQ, D, generator=torch.Generator().manual_seed(5))
    causal = Tq > 1
    for layer in range(LAYERS):
        got = prefix_attention(layer, q, requests, causal=causal)
        for i, (keys, values) in enumerate(caches):
            want = attnkit.attention(
                q[i : i + 1],
                keys[layer].unsqueeze(0),
                values[layer].unsqueeze(0),
                mask=masks.causal() if causal else None,
            )
            torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=2e-6)


def test_prefix_attention_forward_and_backward_under_the_two_x_rule() -> None:
    """One request's cache split into a shared and a private chunk: gradients flow to q and to
    both chunks' keys/values through the LSE merge."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, HQ, D), torch.randn(2, 37, HKV, D), torch.randn(2, 37, HKV, D)

    def two_phase(q, k, v):
        tree = PrefixTree(chunk_size=16)
        # the same 32-token prefix for both rows, private tails of 5 tokens
        shared = [tree.insert(list(range(32)) + [100 + i] * 5, [k[0]], [v[0]]) for i in range(2)]
        tree_b = PrefixTree(chunk_size=16)
        other = [tree_b.insert(list(range(32)) + [200 + i] * 5, [k[1]], [v[1]]) for i in range(2)]
        out_a = prefix_attention(0, q[:1].expand(2, -1, -1, -1), shared)[:1]
        out_b = prefix_attention(0, q[1:].expand(2, -1, -1, -1), other)[:1]
        return torch.cat([out_a, out_b])

    testing.check_against_reference(two_phase, q, k, v).assert_ok()


def test_prefix_errors() -> None:
    tree, requests, _ = build()
    with pytest.raises(ValueError, match="chunk_size"):
        PrefixTree(0)
    with pytest.raises(ValueError, match="empty request"):
        tree.insert([], [], [])
    with pytest.raises(ValueError, match=r"must be \[T=3, Hkv, D\]"):
        tree.insert([1, 2, 3], [torch.zeros(2, HKV, D)], [torch.zeros(2, HKV, D)])
    with pytest.raises(ValueError, match="2 sequences"):
        prefix_attention(0, torch.zeros(3, 1, HQ, D), requests[:2])
    with pytest.raises(ValueError, match="private keys"):
        prefix_attention(0, torch.zeros(3, 6, HQ, D), requests, causal=True)
