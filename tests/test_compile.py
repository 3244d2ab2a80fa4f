"""``attnkit.attention`` inside ``torch.compile(fullgraph=True)`` and ``torch.export``: one custom
op, forward and backward equal to eager, compiled once for every batch of the same shapes."""

from __future__ import annotations

import io

import pytest
import torch
import torch._dynamo.testing
from torch._dynamo.utils import counters

import attnkit
from attnkit import Aux, linear, masks, positional, scores
from attnkit.nn import Attention, AttentionConfig


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def qkv(B=2, T=128, Hq=4, Hkv=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, D, generator=g).requires_grad_() for h in (Hq, Hkv, Hkv)]


def segments(B=2, T=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.rand(B, T, generator=g) < 0.05
    return cuts.long().cumsum(dim=1)


def run(fn, q, k, v, *extra):
    """Output and the gradients of q, k, v and ``extra`` for a fixed upstream gradient."""
    out = fn(q, k, v, *extra)
    out = out[0] + out[1].lse.unsqueeze(-1) if isinstance(out, tuple) else out
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    inputs = [q, k, v, *(t for t in extra if t.requires_grad)]
    return out, torch.autograd.grad(out, inputs, upstream)


def assert_same(compiled, eager):
    (out_c, grads_c), (out_e, grads_e) = compiled, eager
    torch.testing.assert_close(out_c, out_e)
    for grad_c, grad_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(grad_c, grad_e)


def tanh_cap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def alibi_mod(score, b, h, q_idx, kv_idx):
    return score - 0.5 ** (h + 1) * (q_idx - kv_idx).abs()


TANH_CAP = scores.from_score_mod(tanh_cap)
ALIBI = positional.from_score_mod(alibi_mod, num_heads=4)

CASES = {
    "causal": (lambda q, k, v: attnkit.attention(q, k, v, mask=masks.causal()), {}),
    "sliding window on the CPU kernel": (
        lambda q, k, v: attnkit.attention(
            q, k, v, mask=masks.sliding_window(31), backend="blocksparse"
        ),
        {},
    ),
    "documents": (
        lambda q, k, v, seg: attnkit.attention(q, k, v, mask=masks.documents(seg) & masks.causal()),
        {"extra": True},
    ),
    "sigmoid": (
        lambda q, k, v: attnkit.attention(q, k, v, mask=masks.causal(), score=scores.sigmoid()),
        {},
    ),
    "gqa": (lambda q, k, v: attnkit.attention(q, k, v, mask=masks.causal()), {"Hq": 8, "Hkv": 2}),
    "learned bias (its table gets gradients)": (
        lambda q, k, v, table: attnkit.attention(
            q, k, v, bias=positional.relative_bias(4, 16, table=table)
        ),
        {"table": True},
    ),
    "a score_mod as score and bias": (
        lambda q, k, v: attnkit.attention(
            q,
            k,
            v,
            score=TANH_CAP,
            bias=ALIBI,
        ),
        {},
    ),
    "lse (differentiated)": (
        lambda q, k, v: attnkit.attention(q, k, v, mask=masks.causal(), aux=Aux(lse=True)),
        {},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_forward_and_backward_equal_eager(name: str) -> None:
    fn, options = CASES[name]
    q, k, v = qkv(Hq=options.get("Hq", 4), Hkv=options.get("Hkv", 4))
    extra = []
    if options.get("extra"):
        extra = [segments()]
    if options.get("table"):
        extra = [torch.randn(4, 33, generator=torch.Generator().manual_seed(2)).requires_grad_()]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    assert_same(run(compiled, q, k, v, *extra), run(fn, q, k, v, *extra))
    assert counter.frame_count == 1
    graph = str(counter.graphs[0].graph)
    assert "attnkit.eager" in graph


def test_inductor_compiles_a_model_around_the_op() -> None:
    """Projections and a residual around the op, compiled by inductor (which lays out the
    surrounding kernels from the op's fake outputs)."""
    proj = torch.nn.Linear(64, 3 * 64)

    def block(x):
        q, k, v = proj(x).view(2, 64, 3, 4, 16).unbind(2)
        out = attnkit.attention(q, k, v, mask=masks.sliding_window(15) | masks.sinks(4))
        return x + out.flatten(2).relu()

    x = torch.randn(2, 64, 64, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out_c = compiled(x)
    (grad_c,) = torch.autograd.grad(out_c.square().sum(), x)
    out_e = block(x)
    (grad_e,) = torch.autograd.grad(out_e.square().sum(), x)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(grad_c, grad_e)


def test_weights_and_key_sums_come_out_of_the_op() -> None:
    q, k, v = (t.detach() for t in qkv(T=32))
    aux = Aux(weights=True, key_sums=torch.tensor([0, 5, 31]))

    def fn(q, k, v):
        return attnkit.attention(q, k, v, mask=masks.causal(), aux=aux)

    out_c, aux_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    out_e, aux_e = fn(q, k, v)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(aux_c.weights, aux_e.weights)
    torch.testing.assert_close(aux_c.key_sums, aux_e.key_sums)
    assert aux_c.lse is None


def test_one_compile_for_ten_batches_of_the_same_shapes() -> None:
    """New tensors each call, a documents mask built from each batch's segment ids: one graph."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def fn(q, k, v, seg):
        return attnkit.attention(q, k, v, mask=masks.documents(seg) & masks.causal())

    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for step in range(10):
        q, k, v = qkv(seed=step)
        seg = segments(seed=step)
        assert_same(run(compiled, q, k, v, seg), run(fn, q, k, v, seg))
    assert counter.frame_count == 1


def test_changed_options_compile_anew() -> None:
    """The spec is a constant of the graph, guarded: a mask, score or scale passed in with
    other numbers is a new graph, never the old one run with the wrong options (numbers read
    from a compiled function's arguments stay constants, not symbols, when they change), and
    options seen before find their graph again."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def fn(q, k, v, mask, score, scale):
        return attnkit.attention(q, k, v, mask=mask, score=score, scale=scale)

    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    q, k, v = (t.detach() for t in qkv(T=64))
    options = [(7, 5.0, 0.25), (20, 5.0, 0.25), (30, 5.0, 0.25), (20, 3.0, 0.5), (7, 2.0, 0.75)]
    for round_ in range(2):
        for window, cap, scale in options:
            args = (masks.sliding_window(window), scores.softcap(cap), scale)
            torch.testing.assert_close(compiled(q, k, v, *args), fn(q, k, v, *args))
        if round_ == 0:
            compiles = counter.frame_count
            assert compiles >= len(options)
    assert counter.frame_count == compiles


def test_flex_inside_a_compiled_model_does_not_recompile() -> None:
    q, k, v = (t.detach() for t in qkv(T=128))

    def fn(q, k, v):
        return attnkit.attention(q, k, v, mask=masks.sliding_window(31), backend="flex")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
        graphs = counters["stats"]["unique_graphs"]
        for step in range(9):
            q, k, v = (t.detach() for t in qkv(T=128, seed=step + 1))
            torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    assert counters["stats"]["unique_graphs"] == graphs


def test_bad_input_fails_while_tracing_with_the_eager_message() -> None:
    q, k, v = (t.detach() for t in qkv(Hq=4, Hkv=3))

    def fn(q, k, v):
        return attnkit.attention(q, k, v)

    with pytest.raises(Exception, match="Hq must be a multiple of Hkv"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)


LAYERS = {
    "gqa, rope, causal": {},
    "alibi (a bias carrying a tensor)": {"positional": "alibi"},
    "learned relative bias (parameters)": {"positional": "relative_bias"},
    "sliding window, headwise gate": {"mechanism": "sliding_window", "gate": "headwise"},
    "gla (linear, learned gates)": {"mechanism": "gla", "positional": "none", "n_kv_heads": 4},
}


def _layer(options: dict) -> Attention:
    torch.manual_seed(0)
    return Attention(AttentionConfig(**({"d_model": 64, "n_heads": 4, "n_kv_heads": 2} | options)))


def test_converting_a_score_mod_inside_a_compiled_function_says_where_to_do_it() -> None:
    def fn(q, k, v):
        return attnkit.attention(q, k, v, score=scores.from_score_mod(tanh_cap))

    q, k, v = (t.detach() for t in qkv(T=16))
    with pytest.raises(Exception, match="convert it once outside the compiled function"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)


@pytest.mark.parametrize("name", list(LAYERS))
def test_export_round_trip_of_an_attention_layer(name: str) -> None:
    layer = _layer(LAYERS[name])
    x = torch.randn(2, 48, 64)
    program = torch.export.export(layer, (x,))
    assert "attnkit.eager" in str(program.graph)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    other = torch.randn(2, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(other), layer(other))
        torch.testing.assert_close(program.module()(x), layer(x))


def _layer_gradients(layer: Attention, fn, x: torch.Tensor):
    out = fn(x)
    inputs = [x, *layer.parameters()]
    grads = torch.autograd.grad(out.square().sum(), inputs, allow_unused=True)
    # An input the op does not use gets zeros from the compiled backward, None from eager's.
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]
    return out, grads


@pytest.mark.parametrize("mechanism", list(linear.MECHANISMS))
def test_linear_mechanisms_compile_in_a_layer(mechanism: str) -> None:
    """Every linear/recurrent mechanism in a compiled layer: outputs and the gradients of the
    input and of every parameter (projections, learned gates and feature maps) as in eager."""
    layer = _layer({"mechanism": mechanism, "positional": "none", "n_kv_heads": 4})
    x = torch.randn(2, 40, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out_c, grads_c = _layer_gradients(layer, compiled, x)
    out_e, grads_e = _layer_gradients(layer, layer, x)
    torch.testing.assert_close(out_c, out_e)
    for grad_c, grad_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(grad_c, grad_e)
