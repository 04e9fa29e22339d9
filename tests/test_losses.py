"""Losses against small cases computed by hand."""

import math

import pytest
import torch
from torch import nn

from fuss_components.losses import (centered_feature_correlation, centroid_loss, correspondence_term, fedprox_term,
                                    moon_term, quantile_shift, random_grid, sample_at)


def _maps(*vectors):
    """(1, C, 1, n) map whose positions are the given vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


def test_correspondence_term_by_hand():
    # image 1 positions a=(1,0), b=(0,1); image 2 positions (1,0), (1,0)
    f1, f2 = _maps((1, 0), (0, 1)), _maps((1, 0), (1, 0))
    # A = Q = [[1, 1], [0, 0]] (rows: positions of image 1)
    # no centering: -mean(Q * (A - 0.25)) = -(0.75 + 0.75 + 0 + 0) / 4 = -0.375
    assert correspondence_term(f1, f2, f1, f2, 0.25, pointwise=False).item() == pytest.approx(-0.375)
    # pointwise: row means 1 and 0, global mean 0.5 -> A' = 0.5 everywhere -> -(0.25 + 0.25) / 4 = -0.125
    assert correspondence_term(f1, f2, f1, f2, 0.25, pointwise=True).item() == pytest.approx(-0.125)
    # negative head correlations are clamped to zero: flipping image 2's code removes every contribution
    assert correspondence_term(f1, f2, f1, -f2, 0.25, pointwise=False).item() == pytest.approx(0.0)


def test_centered_correlation_keeps_global_mean():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    raw = centered_feature_correlation(a, b, pointwise=False)
    centered = centered_feature_correlation(a, b, pointwise=True)
    assert centered.mean().item() == pytest.approx(raw.mean().item(), abs=1e-6)
    assert torch.allclose(centered.mean(dim=(3, 4)), torch.full_like(centered.mean(dim=(3, 4)), raw.mean()),
                          atol=1e-6)


def test_centroid_loss_by_hand():
    code = _maps((1, 0), (0, 1))  # two positions
    centroids = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # second one at 45 degrees
    # best cosines: 1 and 1/sqrt(2) -> intra = -(1 + 0.70711) / 2 = -0.85355
    loss, assignment, best = centroid_loss(code, centroids, inter_weight=0.0)
    assert loss.item() == pytest.approx(-(1 + 1 / math.sqrt(2)) / 2, abs=1e-6)
    assert assignment.flatten().tolist() == [0, 1]
    assert best.flatten().tolist() == pytest.approx([1.0, 1 / math.sqrt(2)], abs=1e-6)
    # inter term: the only off-diagonal cosine is 1/sqrt(2); lambda 0.5 adds 0.35355 -> -0.5
    loss, _, _ = centroid_loss(code, centroids, inter_weight=0.5)
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)


def test_centroid_loss_gradient_only_reaches_centroids():
    code = torch.randn(1, 4, 2, 2, requires_grad=True)
    centroids = torch.randn(3, 4, requires_grad=True)
    centroid_loss(code, centroids, 0.1)[0].backward()
    assert code.grad is None and centroids.grad is not None


def test_fedprox_term_by_hand():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
    # mu/2 * ((1-0)^2 + (2-1)^2) = 0.1/2 * 2 = 0.1
    value = fedprox_term(layer, {"weight": torch.tensor([[0.0, 1.0]])}, mu=0.1)
    assert value.item() == pytest.approx(0.1)


def test_moon_term_by_hand():
    z = _maps((1, 0))
    # equal to the global code, orthogonal to the previous one: -log(e^2 / (e^2 + e^0)) with tau = 0.5
    assert moon_term(z, z.clone(), _maps((0, 1)), tau=0.5).item() == pytest.approx(math.log(1 + math.exp(-2)))
    # swapped: now the local code sits on the negative
    assert moon_term(z, _maps((0, 1)), z.clone(), tau=0.5).item() == pytest.approx(math.log(1 + math.exp(2)))


def test_quantile_shift_attract_fraction():
    values = torch.arange(100, dtype=torch.float32)
    shift = quantile_shift(values, 0.25)
    assert (values > shift).float().mean().item() == pytest.approx(0.25)


def test_random_grid_and_sampling():
    gen = torch.Generator().manual_seed(0)
    coords = random_grid(2, 11, gen)
    assert coords.shape == (2, 11, 11, 2) and coords.min() >= -1 and coords.max() <= 1
    maps = torch.arange(4.0).reshape(1, 1, 2, 2)
    corners = torch.tensor([[[[-1.0, -1.0], [1.0, 1.0]]]])  # top-left and bottom-right, align_corners=True
    assert sample_at(maps, corners).flatten().tolist() == [0.0, 3.0]
