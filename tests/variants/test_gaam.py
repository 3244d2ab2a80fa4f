"""GAAM (Ioannides et al., 2024): the vectorised weights against the head-by-head reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from attnkit.testing import check_function
from attnkit.variants import (
    GaussianAdaptiveAttention,
    gaussian_adaptive_weights,
    gaussian_adaptive_weights_reference,
)


def draw(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (x * torch.linspace(0.5, 2.0, shape[-1], dtype=torch.float64) + 0.4).to(dtype)


def parameters(heads: int, gaussians: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    offset = torch.randn(heads, gaussians, generator=g, dtype=torch.float64) * 0.5
    scale = 1.0 + torch.rand(heads, gaussians, generator=g, dtype=torch.float64)
    return {"mean_offset": offset.to(dtype), "scale": scale.to(dtype)}


@pytest.mark.parametrize(
    ("shape", "dim", "heads", "gaussians", "dtype"),
    [
        ((2, 33, 24), -1, 4, 1, torch.float32),
        ((2, 33, 24), -1, 3, 3, torch.float32),
        ((2, 40, 16), 1, 5, 2, torch.float32),
        ((2, 33, 24), -1, 4, 2, torch.bfloat16),
    ],
    ids=["features_1g", "features_3g", "tokens_2g", "bf16"],
)
def test_vectorised_matches_reference_forward_and_backward(shape, dim, heads, gaussians, dtype):
    inputs = {"x": draw(*shape, dtype=dtype), **parameters(heads, gaussians, dtype)}

    def vectorised(x, mean_offset, scale):
        return x * gaussian_adaptive_weights(x, mean_offset, scale, dim=dim)

    def reference(x, mean_offset, scale):
        return x * gaussian_adaptive_weights_reference(x, mean_offset, scale, dim=dim)

    check_function(vectorised, reference, inputs).assert_ok()


def test_one_gaussian_is_the_papers_formula() -> None:
    """w = exp(-(x - mu - delta)^2 / (2 xi sigma^2)), normalised over the head's features."""
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25, 3.0, -2.0]], dtype=torch.float64)
    delta, c = 0.3, 1.5
    params = {"mean_offset": torch.tensor([[delta]]), "scale": torch.tensor([[c]])}
    mu, var = x.mean(), x.var()  # unbiased, as the authors' code
    density = torch.exp(-((x - mu - delta) ** 2) / (2 * c**2 * (var + 1e-8)))
    expected = density / density.sum()
    got = gaussian_adaptive_weights(x, **{k: v.double() for k, v in params.items()})
    torch.testing.assert_close(got, expected)


def test_weights_sum_to_one_per_head_chunk() -> None:
    x = draw(2, 9, 24, dtype=torch.float64)
    w = gaussian_adaptive_weights(x, **parameters(4, 2, torch.float64))
    torch.testing.assert_close(w.view(2, 9, 4, 6).sum(-1), torch.ones(2, 9, 4, dtype=x.dtype))


def test_wide_gaussians_average_the_chunk() -> None:
    """As c -> inf every weight tends to 1/n: the layer becomes x / n."""
    layer = GaussianAdaptiveAttention(num_heads=4, init_scale=1e6).double()
    x = draw(2, 9, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x / 6)


def test_module_forward_and_backward_with_its_parameters() -> None:
    layer = GaussianAdaptiveAttention(num_heads=4, num_gaussians=2, dim=-1)
    params = parameters(4, 2)

    def module(x, mean_offset, scale):
        return functional_call(layer, {"mean_offset": mean_offset, "scale": scale}, (x,))

    def reference(x, mean_offset, scale):
        return x * gaussian_adaptive_weights_reference(x, mean_offset, scale)

    check_function(module, reference, {"x": draw(2, 33, 24), **params}).assert_ok()
    assert layer.mean_offset.shape == layer.scale.shape == (4, 2)
    assert torch.all(layer.scale == 2.0) and torch.all(layer.mean_offset == 0)


def test_bad_inputs_raise() -> None:
    x = draw(2, 9, 24)
    with pytest.raises(ValueError, match="5 heads cannot split"):
        GaussianAdaptiveAttention(num_heads=5)(x)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        GaussianAdaptiveAttention(num_heads=0)
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        GaussianAdaptiveAttention(num_heads=2, init_scale=0.0)
    with pytest.raises(ValueError, match=r"both be \[H, G\]"):
        gaussian_adaptive_weights(x, torch.zeros(4, 2), torch.ones(4, 3))
    with pytest.raises(ValueError, match="dim=3 is out of range"):
        gaussian_adaptive_weights(x, torch.zeros(4, 1), torch.ones(4, 1), dim=3)
    assert math.isfinite(GaussianAdaptiveAttention(num_heads=4)(x).sum().item())
