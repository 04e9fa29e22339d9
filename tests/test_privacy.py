"""Centroid privacy without a federation or FLARE: the math in ``fuss_components.privacy`` (clipping, noise,
sensitivity, (epsilon, delta) of the Gaussian mechanism, composition). The filter that calls it, the job options
and the site policy example: ``tests/test_flare_privacy.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fuss_components import privacy as P


# ---------------------------------------------------------------------------------------------- the math


def test_clip_rows_scales_only_rows_above_the_norm():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]])
    clipped, n = P.clip_rows(x, 1.0)
    assert n == 2
    assert torch.allclose(clipped.norm(dim=1), torch.tensor([1.0, 0.5, 0.0, 1.0]))
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8]))  # direction kept
    assert torch.equal(clipped[1], x[1]) and torch.equal(clipped[2], x[2])
    with pytest.raises(ValueError):
        P.clip_rows(x, 0.0)


def test_privatize_adds_gaussian_noise_of_std_sigma_times_clip():
    x = torch.randn(400, 70) * 3
    clipped, _ = P.clip_rows(x, 0.5)
    out, n = P.privatize_centroids(x, 0.5, 2.0, torch.Generator().manual_seed(1))
    assert n == 400 and out.shape == x.shape and out.dtype == x.dtype
    noise = (out - clipped).double().flatten()
    assert abs(float(noise.mean())) < 4 * 1.0 / math.sqrt(noise.numel())  # std of the mean: sigma*C/sqrt(n)
    assert float(noise.std()) == pytest.approx(1.0, rel=0.03)  # sigma * C = 2.0 * 0.5
    same, _ = P.privatize_centroids(x, 0.5, 2.0, torch.Generator().manual_seed(1))
    assert torch.equal(out, same)  # a given generator is reproducible ...
    a, _ = P.privatize_centroids(x, 0.5, 2.0)
    b, _ = P.privatize_centroids(x, 0.5, 2.0)
    assert not torch.equal(a, b)  # ... without one, every call draws fresh OS entropy
    zero, _ = P.privatize_centroids(x, 0.5, 0.0)
    assert torch.equal(zero, clipped)


def test_sensitivity_bounds_every_pair_of_clipped_matrices_and_is_attained():
    k, d, c = 5, 7, 0.8
    delta2 = P.l2_sensitivity(k, c)
    assert delta2 == pytest.approx(2 * c * math.sqrt(k))
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):  # any two data sets, however different: the clipped outputs are within Delta_2
        a, _ = P.clip_rows(torch.randn(k, d, generator=gen) * 5, c)
        b, _ = P.clip_rows(torch.randn(k, d, generator=gen) * 5, c)
        assert float((a - b).norm()) <= delta2 + 1e-6
    a, _ = P.clip_rows(torch.ones(k, d), c)
    assert float((a - (-a)).norm()) == pytest.approx(delta2, rel=1e-6)  # antipodal rows: the bound is tight


def test_gaussian_mechanism_epsilon_delta():
    # delta at epsilon = 0 of a mu-GDP mechanism is the total variation Phi(mu/2) - Phi(-mu/2)
    assert P.gaussian_delta(1.0, 0.0) == pytest.approx(norm.cdf(0.5) - norm.cdf(-0.5), abs=1e-12)
    for mu in (0.1, 0.5, 1.0, 3.0, 20.0):
        for eps in (0.1, 1.0, 5.0):
            delta = P.gaussian_delta(mu, eps)
            if 1e-300 < delta < 1:
                assert P.gaussian_epsilon(mu, delta) == pytest.approx(eps, rel=1e-6)  # exact inverse
    # the analytic bound is never worse than the classical one where the classical one is valid (epsilon < 1)
    for std in (5.0, 10.0, 40.0):
        classical = P.classical_gaussian_epsilon(1.0, std, 1e-5)
        if classical < 1:
            assert P.gaussian_epsilon(1.0 / std, 1e-5) <= classical
    # more noise: less epsilon; no noise: no guarantee
    eps = [P.account(11, 1.0, s, 1e-5).epsilon for s in (0.5, 1, 2, 5, 10, 30)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert math.isinf(P.account(11, 1.0, 0.0).epsilon)
    with pytest.raises(ValueError):
        P.gaussian_epsilon(1.0, 0.0)


def test_account_per_round_and_composed():
    acc = P.account(num_clusters=11, clip=2.0, noise_multiplier=10.0, delta=1e-5, rounds=10)
    assert acc.sensitivity == pytest.approx(4 * math.sqrt(11))
    assert acc.noise_std == pytest.approx(20.0)
    assert acc.mu == pytest.approx(2 * math.sqrt(11) / 10)  # independent of C
    assert acc.epsilon == pytest.approx(P.account(11, 0.1, 10.0, 1e-5).epsilon)
    assert (acc.total_epsilon, acc.total_delta) == pytest.approx((10 * acc.epsilon, 1e-4))  # simple composition
    assert acc.total_epsilon_gdp < acc.total_epsilon  # sqrt(R) mu -GDP is tighter
    assert acc.total_epsilon_gdp == pytest.approx(P.gaussian_epsilon(math.sqrt(10) * acc.mu, 1e-4))
    text = acc.summary()
    assert "2*C*sqrt(K)" in text and "after 10 round(s)" in text and "simple composition" in text
    assert set(acc.to_dict()) >= {"epsilon", "delta", "total_epsilon", "total_delta", "sensitivity"}


# ---------------------------------------------------------------------------------------------- a centroid release


def test_centroid_release_keeps_type_and_dtype_and_is_described():
    with pytest.raises(ValueError, match="clip"):
        P.check_noise_settings(0.0, 1.0, 1e-5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        P.check_noise_settings(1.0, -1.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        P.check_noise_settings(1.0, 1.0, 1.0)
    rows = np.full((3, 4), 2.0, dtype=np.float64)  # every row has norm 4 > C
    released, num_clipped = P.release_centroids(rows, 0.5, 0.0)
    assert isinstance(released, np.ndarray) and released.dtype == np.float64 and num_clipped == 3
    assert np.allclose(np.linalg.norm(released, axis=1), 0.5)
    released, num_clipped = P.release_centroids(torch.zeros(3, 4, dtype=torch.float16), 0.5, 1.0)
    assert released.dtype == torch.float16 and num_clipped == 0 and not torch.equal(released, torch.zeros(3, 4))
    assert P.describe_release(3, 3, 0.5, 0.0, 1e-5, 1).endswith("release 1: no noise, no DP guarantee (epsilon=inf)")
    text = P.describe_release(3, 0, 0.5, 1.0, 1e-5, 2, rounds=4)
    assert text.startswith("clip C=0.5, sigma=1: 0/3 rows clipped, noise std 0.5 per coordinate; release 2: ")
    assert "cumulative (epsilon=" in text and "delta=2e-05" in text and "; all 4 rounds: (epsilon=" in text
