"""The catalog: every mechanism builds arguments attention accepts and matches its definition."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import attnkit
from attnkit import catalog
from attnkit import nn as ak
from attnkit.grid import balanced_grid
from attnkit.testing import check_function

SPECS = {
    "self": catalog.InputSpec(B=2, Tq=48, Tk=48, Hq=4, Hkv=2, D=16),
    "cross": catalog.InputSpec(B=2, Tq=17, Tk=48, Hq=4, Hkv=2, D=16),
}


def _of_kind(kind: str) -> list[str]:
    return [name for name, m in catalog.MECHANISMS.items() if m.kind == kind]


# -- every attention entry against its own definition, written out here ----------------------
#
# Each entry's pattern, score function and bias are written below from its summary and paper
# on index grids, without attnkit's masks, scores or biases; the 2x rule's golden is this
# formula in float64 and its baseline the same formula in float32. Comparing attnkit's
# reference with itself would pass a wrong predicate, offset or sink count; this does not.
# The long shapes exceed every window (up to 511 keys), chunk (256) and sink span (64) of the
# catalog, so the ends of each pattern are inside the call.

PATTERN_SPECS = {
    **SPECS,
    "long": catalog.InputSpec(B=2, Tq=600, Tk=600, Hq=4, Hkv=2, D=16),
    "long_cross": catalog.InputSpec(B=2, Tq=77, Tk=600, Hq=4, Hkv=2, D=16),
}

Weights = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Index:
    """Broadcastable index grids of one call: batch ``b [B,1,1,1]``, head ``h [1,H,1,1]``,
    query position ``p [1,1,Tq,1]`` (query ``i`` sits on key ``i + Tk - Tq``: the last query
    on the last key) and key position ``k [1,1,1,Tk]``."""

    spec: catalog.InputSpec

    @property
    def b(self) -> Tensor:
        return torch.arange(self.spec.B).view(-1, 1, 1, 1)

    @property
    def h(self) -> Tensor:
        return torch.arange(self.spec.Hq).view(1, -1, 1, 1)

    @property
    def p(self) -> Tensor:
        return torch.arange(self.spec.Tq).view(1, 1, -1, 1) + self.spec.Tk - self.spec.Tq

    @property
    def k(self) -> Tensor:
        return torch.arange(self.spec.Tk).view(1, 1, 1, -1)

    @property
    def causal(self) -> Tensor:
        return self.k <= self.p


def _softmax(s: Tensor, allowed: Tensor) -> Tensor:
    return s.masked_fill(~allowed, float("-inf")).softmax(-1)


def _sigmoid(s: Tensor, allowed: Tensor) -> Tensor:
    """Unnormalised ``sigmoid(s - log n)``, ``n`` the number of keys (Ramapuram et al.)."""
    return torch.sigmoid(s - math.log(s.shape[-1])) * allowed


def _softplus_l1(s: Tensor, allowed: Tensor) -> Tensor:
    """``softplus(log(n_i) s)`` over the ``n_i`` visible keys, l1-normalised (LSSA)."""
    n = allowed.sum(-1, keepdim=True).to(s.dtype)
    w = torch.nn.functional.softplus(s * n.log()) * allowed
    return w / w.sum(-1, keepdim=True)


def _softcap(cap: float) -> Weights:
    return lambda s, allowed: _softmax(cap * torch.tanh(s / cap), allowed)


def _relu(s: Tensor, allowed: Tensor) -> Tensor:
    """Unnormalised ``relu(s) / L``, ``L`` the number of keys (Wortsman et al.)."""
    return torch.relu(s) / s.shape[-1] * allowed


def _cog(s: Tensor, allowed: Tensor) -> Tensor:
    """``sign(s) e^|s| / sum e^|s|`` (Lv et al., SignExp)."""
    magnitude = s.abs().masked_fill(~allowed, float("-inf"))
    e = (magnitude - magnitude.amax(-1, keepdim=True)).exp()
    return torch.sign(s) * e / e.sum(-1, keepdim=True)


def _coords(t: Tensor, grid: tuple[int, ...]) -> list[Tensor]:
    """Row-major coordinates of token indices ``t`` on ``grid`` (last axis fastest)."""
    out = []
    for size in reversed(grid):
        out.append(t % size)
        t = t // size
    return out[::-1]


def _window_axis(
    xq: Tensor, xk: Tensor, n: int, kernel: int, dilation: int, stride: int, causal: bool
) -> Tensor:
    """Generalized neighborhood attention along one axis of ``n`` positions: a query attends
    only within its dilation group (positions equal mod ``dilation``, an axis of their own);
    ``stride`` queries share the window of their leader (centre query, last when causal);
    non-causal windows hold ``kernel`` keys centred on the leader (one more on the left when
    even) shifted inward at the ends; causal ones end at the query's position."""
    group = xq % dilation
    n_group = (n - group + dilation - 1) // dilation
    xs, ys = xq // dilation, xk // dilation
    same_group = xk % dilation == group
    if causal:
        leader = torch.minimum((xs // stride) * stride + stride - 1, n_group - 1)
        return same_group & (ys <= xs) & (leader - ys < kernel)
    leader = torch.minimum((xs // stride) * stride + stride // 2, n_group - 1)
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    centre = torch.maximum(torch.minimum(leader, n_group - 1 - right), torch.full_like(xq, left))
    return same_group & (ys >= centre - left) & (ys <= centre + right)


def _on_grid(ix: Index, grid: tuple[int, ...], axis_rule: Callable[..., Tensor]) -> Tensor:
    """A query sees a key iff every axis of the grid allows it."""
    allowed = torch.ones((), dtype=torch.bool)
    qs, ks = _coords(ix.p, grid), _coords(ix.k, grid)
    for axis, (xq, xk) in enumerate(zip(qs, ks, strict=True)):
        allowed = allowed & axis_rule(axis, xq, xk, grid[axis])
    return allowed


def _neighborhood(
    ix: Index, grid: tuple[int, ...], kernel, dilation=None, stride=None, causal=None
) -> Tensor:
    n = len(grid)
    dilation, stride = dilation or (1,) * n, stride or (1,) * n
    causal = causal or (False,) * n

    def rule(a: int, xq: Tensor, xk: Tensor, size: int) -> Tensor:
        return _window_axis(xq, xk, size, kernel[a], dilation[a], stride[a], causal[a])

    return _on_grid(ix, grid, rule)


def _halo(ix: Index, grid: tuple[int, ...], block: int, halo: int) -> Tensor:
    """Blocks of ``block`` per axis; a query sees its block widened by ``halo`` each side."""

    def rule(a: int, xq: Tensor, xk: Tensor, size: int) -> Tensor:
        start = (xq // block) * block
        return (xk >= start - halo) & (xk < start + block + halo)

    return _on_grid(ix, grid, rule)


def _t5_bucket(offset: int, bidirectional: bool, buckets: int = 32, max_distance: int = 128):
    """T5's ``_relative_position_bucket`` for ``offset = key - query`` (its float32 log)."""
    bucket = 0
    if bidirectional:
        buckets //= 2
        bucket += buckets if offset > 0 else 0
        distance = abs(offset)
    else:
        distance = max(-offset, 0)
    exact = buckets // 2
    if distance < exact:
        return bucket + distance
    ratio = torch.tensor(distance / exact, dtype=torch.float32).log()
    ratio = ratio / math.log(max_distance / exact) * (buckets - exact)
    return bucket + min(exact + int(ratio.item()), buckets - 1)


def _t5(ix: Index, kwargs: dict, bidirectional: bool) -> Tensor:
    offsets = ix.k - ix.p
    lookup = {o: _t5_bucket(o, bidirectional) for o in offsets.unique().tolist()}
    buckets = offsets.clone().apply_(lookup.__getitem__)
    return kwargs["bias"].table.detach()[buckets, ix.h]  # table [num_buckets, H]


def _kerple(ix: Index, kwargs: dict, kernel: str) -> Tensor:
    """KERPLE from its raw parameters: ``r1 = softplus(raw)``; ``r2 = 2 sigmoid(raw)``
    (power, in (0, 2)) or ``softplus(raw)`` (log)."""
    bias = kwargs["bias"]
    softplus = torch.nn.functional.softplus
    r1 = softplus(bias.r1_raw.detach().double())[ix.h]
    raw2 = bias.r2_raw.detach().double()
    d = (ix.p - ix.k).abs().double()
    if kernel == "power":
        return -r1 * d ** (2 * torch.sigmoid(raw2)[ix.h])
    return -r1 * torch.log1p(softplus(raw2)[ix.h] * d)


def _duo(ix: Index) -> Tensor:
    """Retrieval heads (even KV heads) full causal; streaming heads 64 sinks + 256 recent."""
    kv_head = ix.h // (ix.spec.Hq // ix.spec.kv_heads)
    streaming = (ix.k < 64) | (ix.p - ix.k < 256)
    return ix.causal & ((kv_head % 2 == 0) | streaming)


def _s2(ix: Index) -> Tensor:
    """S2-Attention (DKernel's local-stride blocks of 64): 4 local blocks, and every 8th key
    block at a phase of ``kv_head * max(1, 8 // Hkv)``."""
    qb, kb = ix.p // 64, ix.k // 64
    kv_head = ix.h // (ix.spec.Hq // ix.spec.kv_heads)
    phase = kv_head * max(1, 8 // ix.spec.kv_heads)
    return ix.causal & ((qb - kb < 4) | ((kb + phase) % 8 == 0))


def _power(ix: Index) -> Tensor:
    """Blocks of 64: the own block, blocks 2^i back, and the first block as a sink."""
    d = ix.p // 64 - ix.k // 64
    powers = torch.tensor([2**i for i in range(20)])
    return ix.causal & ((d == 0) | torch.isin(d, powers) | (ix.k < 64))


def _shifted(ix: Index, shift_queries: bool) -> Tensor:
    """Chunks of 256; the second half of the heads shifts keys (and queries) by 128."""
    shift = 128 * (ix.h >= ix.spec.Hq // 2)
    q_shift = shift if shift_queries else 0
    return ix.causal & ((ix.p + q_shift) // 256 == (ix.k + shift) // 256)


def _grid(spec: catalog.InputSpec, ndim: int) -> tuple[int, ...]:
    return balanced_grid(spec.Tk, ndim)


def _clip(kernel: tuple[int, ...], grid: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(a, b) for a, b in zip(kernel, grid, strict=True))


def _dilated_2d(ix: Index) -> Tensor:
    grid = _grid(ix.spec, 2)
    kernel = _clip((7, 7), grid)
    dilation = tuple(max(1, min(4, s // k)) for s, k in zip(grid, kernel, strict=True))
    return _neighborhood(ix, grid, kernel, dilation=dilation)


def _segments(ix: Index) -> Tensor:
    return catalog.document_segments(ix.spec)


#: name -> (index, build kwargs) -> (allowed, bias or None, weights), each from its definition.
SCRATCH: dict[str, Callable[[Index, dict], tuple[Tensor, Tensor | None, Weights]]] = {
    "softmax": lambda ix, kw: (ix.k >= 0, None, _softmax),
    "causal": lambda ix, kw: (ix.causal, None, _softmax),
    "memory_efficient": lambda ix, kw: (ix.causal, None, _softmax),
    "sliding_window": lambda ix, kw: (ix.causal & (ix.k >= ix.p - 255), None, _softmax),
    "sinks_window": lambda ix, kw: (
        ix.causal & ((ix.k < 4) | (ix.k >= ix.p - 255)),
        None,
        _softmax,
    ),
    "prefix_lm": lambda ix, kw: ((ix.k < ix.spec.Tk // 4) | ix.causal, None, _softmax),
    "documents": lambda ix, kw: (
        ix.causal & (_segments(ix)[ix.b, ix.p] == _segments(ix)[ix.b, ix.k]),
        None,
        _softmax,
    ),
    "key_padding": lambda ix, kw: (ix.k < catalog.padding_lengths(ix.spec)[ix.b], None, _softmax),
    "sigmoid": lambda ix, kw: (ix.causal, None, _sigmoid),
    "softplus_l1": lambda ix, kw: (ix.causal, None, _softplus_l1),
    "softcap": lambda ix, kw: (ix.causal, None, _softcap(50.0)),
    "cog": lambda ix, kw: (ix.causal, None, _cog),
    "relu": lambda ix, kw: (ix.k >= 0, None, _relu),
    "alibi": lambda ix, kw: (
        ix.causal,
        -(2.0 ** (-8.0 * (ix.h + 1).double() / ix.spec.Hq)) * (ix.p - ix.k).abs(),  # Hq = 2^n
        _softmax,
    ),
    "relative_bias": lambda ix, kw: (
        ix.causal,
        kw["bias"].table.detach()[ix.h, (ix.k - ix.p).clamp(-128, 128) + 128],
        _softmax,
    ),
    "kerple_log": lambda ix, kw: (ix.causal, _kerple(ix, kw, "log"), _softmax),
    "kerple_power": lambda ix, kw: (ix.causal, _kerple(ix, kw, "power"), _softmax),
    "t5_bias": lambda ix, kw: (ix.causal, _t5(ix, kw, bidirectional=False), _softmax),
    "t5_bias_bidirectional": lambda ix, kw: (ix.k >= 0, _t5(ix, kw, bidirectional=True), _softmax),
    "neighborhood_1d": lambda ix, kw: (
        _neighborhood(ix, (ix.spec.Tk,), (min(255, ix.spec.Tk),)),
        None,
        _softmax,
    ),
    "neighborhood_2d": lambda ix, kw: (
        _neighborhood(ix, _grid(ix.spec, 2), _clip((13, 13), _grid(ix.spec, 2))),
        None,
        _softmax,
    ),
    "dilated_neighborhood_2d": lambda ix, kw: (_dilated_2d(ix), None, _softmax),
    "neighborhood_3d_causal_frames": lambda ix, kw: (
        _neighborhood(
            ix,
            _grid(ix.spec, 3),
            _clip((3, 7, 7), _grid(ix.spec, 3)),
            causal=(True, False, False),
        ),
        None,
        _softmax,
    ),
    "gna_blocked_2d": lambda ix, kw: (
        _neighborhood(
            ix,
            _grid(ix.spec, 2),
            _clip((16, 16), _grid(ix.spec, 2)),
            stride=_clip((16, 16), _grid(ix.spec, 2)),
        ),
        None,
        _softmax,
    ),
    "halo_2d": lambda ix, kw: (
        _halo(ix, _grid(ix.spec, 2), min(8, *_grid(ix.spec, 2)), 3),
        None,
        _softmax,
    ),
    "dilated_window": lambda ix, kw: (
        ix.causal & (ix.p - ix.k <= 254) & ((ix.p - ix.k) % 2 == 0),
        None,
        _softmax,
    ),
    "sparse_transformer_strided": lambda ix, kw: (
        ix.causal & (((ix.p - ix.k) % 128 == 0) | (ix.p - ix.k <= 127)),
        None,
        _softmax,
    ),
    "s2_attention": lambda ix, kw: (_s2(ix), None, _softmax),
    "power_attention": lambda ix, kw: (_power(ix), None, _softmax),
    "scca": lambda ix, kw: (_shifted(ix, shift_queries=False), None, _softmax),
    "longlora_shift": lambda ix, kw: (_shifted(ix, shift_queries=True), None, _softmax),
    "block_causal": lambda ix, kw: (ix.k // 256 <= ix.p // 256, None, _softmax),
    "chunked_local": lambda ix, kw: (ix.causal & (ix.k // 256 == ix.p // 256), None, _softmax),
    "longformer_global": lambda ix, kw: (
        ((ix.p - ix.k).abs() <= 255) | (ix.k == 0) | (ix.p == 0),
        None,
        _softmax,
    ),
    "moa_windows": lambda ix, kw: (
        ix.causal & (ix.p - ix.k < 64 * 2 ** (ix.h % 6)),
        None,
        _softmax,
    ),
    "duo_attention": lambda ix, kw: (_duo(ix), None, _softmax),
}


def written_out(allowed: Tensor, bias: Tensor | None, weights: Weights) -> Callable[..., Tensor]:
    """``out_i = sum_j w(s_ij) v_j`` with ``s = q.k / sqrt(D) + bias``, in the inputs' dtype;
    query head ``h`` reads KV head ``h // (Hq / Hkv)``."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        group = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
        if bias is not None:
            s = s + bias.to(s.dtype)
        return torch.einsum("bhij,bjhd->bihd", weights(s, allowed), v)

    return attend


def test_every_attention_entry_has_a_written_out_definition() -> None:
    assert set(SCRATCH) == set(_of_kind("attention"))


@pytest.mark.parametrize("shape", PATTERN_SPECS)
@pytest.mark.parametrize("name", _of_kind("attention"))
def test_mechanism_matches_reference(name: str, shape: str) -> None:
    """The entry on its backend (the reference unless it names one) against the definition
    written out above, forward and backward, under the 2x rule."""
    mechanism = catalog.get(name)
    spec = PATTERN_SPECS[shape]
    q, k, v = spec.make_inputs()
    kwargs = mechanism.build(spec)
    allowed, bias, weights = SCRATCH[name](Index(spec), kwargs)
    allowed = allowed.expand(spec.B, spec.Hq, spec.Tq, spec.Tk)
    assert allowed.any(-1).all(), "every query of these entries sees a key"
    backend = mechanism.backend or "reference"

    def fast(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attnkit.attention(q, k, v, backend=backend, **kwargs)

    reference = written_out(allowed, bias, weights)
    check_function(fast, reference, {"q": q, "k": k, "v": v}).assert_ok()


@pytest.mark.parametrize("shape", SPECS)
@pytest.mark.parametrize("name", _of_kind("function"))
def test_function_mechanism_matches_its_reference(name: str, shape: str) -> None:
    mechanism = catalog.get(name)
    spec = SPECS[shape]
    if spec.Tq != spec.Tk and not mechanism.cross:
        with pytest.raises(ValueError, match="self-attention"):
            mechanism.run(spec)(*spec.make_inputs())
        return
    q, k, v = spec.make_inputs()
    fast, reference = mechanism.run(spec), mechanism.reference(spec)
    report = check_function(fast, reference, {"q": q, "k": k, "v": v})
    report.assert_ok()


#: Which tokens each layer entry's output at token t reads: "causal" (tokens <= t: the head
#: layouts and gated outputs run causal softmax attention), "token-wise" (token t only: GAAM
#: re-weights each token's features) or "bidirectional" (every token: GPSA on a patch grid).
LAYER_READS = {
    **dict.fromkeys(
        ["mha", "gqa", "mqa", "mla", "transmla", "moh", "kdgqa", "dgqa", "dcmha"], "causal"
    ),
    **dict.fromkeys(["knocking_heads", "talking_heads", "gated_attention"], "causal"),
    "gated_attention_elementwise": "causal",
    "gaam": "token-wise",
    "gpsa": "bidirectional",
}

#: Layouts that mix every head's scores or regroup heads per call: they refuse a KV cache.
NO_KV_CACHE = {"kdgqa", "dgqa", "dcmha", "talking_heads"}


def test_every_layer_entry_says_which_tokens_it_reads() -> None:
    assert set(LAYER_READS) == set(_of_kind("layer"))


def _changed(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", _of_kind("layer"))
def test_layer_mechanism_reads_only_the_tokens_it_may(name: str) -> None:
    """Rewriting the last tokens leaves earlier outputs exactly as they were (causal and
    token-wise) or changes them (bidirectional); rewriting the first tokens changes later
    outputs unless the layer is token-wise; batch rows never mix. The same holds for the
    gradients, which reach every parameter."""
    spec, cut = SPECS["self"], 30
    reads = LAYER_READS[name]
    torch.manual_seed(0)
    layer = catalog.get(name).layer(spec)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(spec.B, spec.Tq, spec.Hq * spec.D, generator=g)
    later, earlier, other_row = x.clone(), x.clone(), x.clone()
    later[:, cut:] = torch.randn(later[:, cut:].shape, generator=g) * 3 + 1
    earlier[:, :cut] = torch.randn(earlier[:, :cut].shape, generator=g) * 3 + 1
    other_row[1] = torch.randn(other_row[1].shape, generator=g)
    with torch.no_grad():
        out = layer(x)
        out_later, out_earlier, out_row = layer(later), layer(earlier), layer(other_row)
    assert out.shape == x.shape
    assert torch.equal(out_row[0], out[0]), "batch rows mix"
    assert _changed(out_later[:, cut:], out[:, cut:]) > 1e-2, "outputs ignore their own tokens"
    if reads == "bidirectional":
        assert _changed(out_later[:, :cut], out[:, :cut]) > 1e-2, "earlier tokens ignore later"
    else:
        assert torch.equal(out_later[:, :cut], out[:, :cut]), "earlier outputs read later tokens"
    if reads == "token-wise":
        assert torch.equal(out_earlier[:, cut:], out[:, cut:]), "tokens read other tokens"
    else:
        assert _changed(out_earlier[:, cut:], out[:, cut:]) > 1e-2, "later tokens ignore context"

    x = x.requires_grad_(True)
    layer(x)[:, :cut].square().sum().backward()
    assert x.grad[:, :cut].abs().sum() > 0
    if reads == "bidirectional":
        assert x.grad[:, cut:].abs().sum() > 0
    else:
        assert torch.equal(x.grad[:, cut:], torch.zeros_like(x.grad[:, cut:]))
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", [n for n, r in LAYER_READS.items() if r == "causal"])
def test_causal_layer_decodes_with_a_cache_as_its_full_forward(name: str) -> None:
    """A prefill then one token at a time through a KV cache gives the full forward's outputs
    (positions continue from the cache); layouts that need every head's scores refuse."""
    spec = SPECS["self"]
    torch.manual_seed(0)
    layer = catalog.get(name).layer(spec)
    x = torch.randn(spec.B, spec.Tq, spec.Hq * spec.D, generator=torch.Generator().manual_seed(1))
    prefill = spec.Tq - 8
    cache = ak.DenseCache()
    with torch.no_grad():
        if name in NO_KV_CACHE:
            with pytest.raises(ValueError, match="cannot decode with a KV cache"):
                layer(x, cache=cache)
            return
        full = layer(x)
        steps = [layer(x[:, :prefill], cache=cache)]
        steps += [layer(x[:, t : t + 1], cache=cache) for t in range(prefill, spec.Tq)]
    assert cache.seen(0) == spec.Tq
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_register_needs_exactly_one_kind() -> None:
    def paper(name: str) -> catalog.Mechanism:
        return catalog.Mechanism(name, "exact", "T — A (2020)", "s")

    with pytest.raises(ValueError, match="exactly one of build"):
        catalog.register(paper("nothing"))
    with pytest.raises(ValueError, match="exactly one of build"):
        catalog.register(
            catalog.Mechanism("two", "exact", "T — A (2020)", "s", build=dict, layer=dict)
        )
    with pytest.raises(ValueError, match="needs both run and reference"):
        catalog.register(catalog.Mechanism("half", "exact", "T — A (2020)", "s", run=dict))
    assert not {"nothing", "two", "half"} & set(catalog.MECHANISMS)


@pytest.mark.parametrize("name", list(catalog.MECHANISMS))
def test_entries_are_documented(name: str) -> None:
    mechanism = catalog.get(name)
    assert mechanism.family in catalog.FAMILIES
    assert re.search(r"\(\d{4}\)", mechanism.paper), "paper needs title, authors and (year)"
    assert " — " in mechanism.paper
    assert mechanism.summary


def test_core_entries_are_present() -> None:
    expected = {
        "softmax", "causal", "sliding_window", "sinks_window", "prefix_lm", "documents",
        "key_padding", "sigmoid", "softplus_l1", "softcap", "alibi", "relative_bias",
        "memory_efficient",
    }  # fmt: skip
    assert expected <= set(catalog.MECHANISMS)


def test_sliding_window_sees_256_keys() -> None:
    spec = catalog.InputSpec(Tq=600, Tk=600)
    mask = catalog.get("sliding_window").build(spec)["mask"]
    counts = attnkit.masks.row_counts(mask, 600, 600)
    assert counts.max().item() == 256
    assert counts[0, 0, 0].item() == 1


def test_sinks_window_is_causal() -> None:
    spec = catalog.InputSpec(Tq=300, Tk=300)
    dense = catalog.get("sinks_window").build(spec)["mask"].dense(300, 300)[0, 0]
    assert not dense.triu(1).any()
    assert dense[299, :4].all() and not dense[299, 4:44].any()


def test_documents_are_deterministic_and_packed() -> None:
    spec = catalog.InputSpec(B=3, Tq=512, Tk=512)
    first = catalog.document_segments(spec)
    assert torch.equal(first, catalog.document_segments(spec))
    assert first.shape == (3, 512)
    assert (first.diff(dim=1) >= 0).all()
    assert first[:, -1].min() >= 3  # several documents per row
    assert not torch.equal(first[0], first[1])


def test_get_unknown_lists_names() -> None:
    with pytest.raises(KeyError, match="sliding_window") as error:
        catalog.get("slidng_window")
    assert "slidng_window" in str(error.value)


def test_register_rejects_duplicates_and_unknown_families() -> None:
    existing = catalog.get("causal")
    with pytest.raises(ValueError, match="already registered"):
        catalog.register(existing)
    with pytest.raises(ValueError, match="unknown family"):
        catalog.register(catalog.Mechanism("x", "no such family", "p", "s", lambda spec: {}))


def test_register_adds_a_mechanism() -> None:
    mechanism = catalog.Mechanism(
        "test_local_8", "static sparse", "test (2024)", "window of 8",
        lambda spec: {"mask": attnkit.masks.sliding_window(7)},
    )  # fmt: skip
    catalog.register(mechanism)
    try:
        assert catalog.get("test_local_8") is mechanism
        assert "reference" in catalog.backends_for(mechanism)
    finally:
        del catalog.MECHANISMS["test_local_8"]


def test_backends_for_probes_supports() -> None:
    for name, mechanism in catalog.MECHANISMS.items():
        for grad in (False, True):
            found = catalog.backends_for(mechanism, grad=grad)
            assert ("reference" in found) == (mechanism.kind == "attention"), name
    # SDPA computes softmax only.
    assert "sdpa" in catalog.backends_for(catalog.get("causal"))
    assert "sdpa" not in catalog.backends_for(catalog.get("sigmoid"))


def test_attention_mechanisms_compose_by_name() -> None:
    spec = catalog.InputSpec(Tq=64, Tk=64)
    composed = catalog.get("sigmoid+sliding_window")
    options = composed.build(spec)
    parts = [catalog.get(name).build(spec) for name in ("sigmoid", "sliding_window")]
    assert options["score"] == parts[0]["score"]
    expected = parts[0]["mask"] & parts[1]["mask"]
    assert torch.equal(options["mask"].dense(64, 64), expected.dense(64, 64))
    assert composed.kind == "attention" and composed.name == "sigmoid+sliding_window"
    with_bias = catalog.get("alibi+sliding_window").build(spec)
    assert with_bias["bias"] is not None and "score" not in with_bias


def test_compositions_that_mean_two_things_are_refused() -> None:
    with pytest.raises(ValueError, match="both set a score"):
        catalog.get("sigmoid+softplus_l1").build(catalog.InputSpec())
    with pytest.raises(ValueError, match="only attention mechanisms compose"):
        catalog.get("sigmoid+rope")
    with pytest.raises(KeyError, match="no mechanism named 'nope'"):
        catalog.get("sigmoid+nope")
