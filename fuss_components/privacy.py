"""Centroid privacy: clip every centroid row, add Gaussian noise, and account (epsilon, delta) per round.

Pure functions (no FLARE): ``fuss_flare.filters.CentroidPrivacyFilter`` calls :func:`privatize_centroids` and
:func:`account` on a site's result before it leaves the site, and ``poc/privacy_sweep.py`` calls the same
function in the in-process federation to measure the effect on mIoU.

What is released, and its sensitivity
-------------------------------------
Per round, a training site releases its centroid matrix ``M`` (``K x D``: K clusters, D code dimensions). The
mechanism releases ``clip_C(M) + N(0, (sigma * C)^2 I)``, where ``clip_C`` scales every row whose L2 norm exceeds
``C`` down to norm ``C`` (rows inside the ball are unchanged) and ``sigma`` is the *noise multiplier* (noise
standard deviation per coordinate in units of ``C``).

``M`` is the result of many Adam steps over all the site's images, so no useful bound on how much one image can
move it is known. Clipping gives a bound that needs none: every row of ``clip_C(M)`` lies in the ball of radius
``C``, so for ANY two datasets ``X, X'`` of the site (one image changed, or the whole local dataset replaced)

    || clip_C(M(X)) - clip_C(M(X')) ||_F  <=  sqrt(K * (2C)^2)  =  2 C sqrt(K)  =: Delta_2.

``Delta_2`` is the L2 sensitivity used below. Because it holds for every pair of datasets, the guarantee is
*site-level*: it protects the whole local dataset, not only a single image, which is why it needs a lot of noise.

Per round: the Gaussian mechanism with sensitivity ``Delta_2`` and noise std ``s = sigma * C`` is ``mu``-GDP with
``mu = Delta_2 / s = 2 sqrt(K) / sigma`` (note: independent of ``C`` and of ``D``), and is (epsilon, delta)-DP
exactly when (analytic Gaussian mechanism, Balle & Wang 2018, Thm. 8)

    delta >= Phi(mu/2 - epsilon/mu) - exp(epsilon) * Phi(-mu/2 - epsilon/mu).

:func:`gaussian_epsilon` solves this for epsilon (valid for every epsilon, unlike the classical
``s >= Delta sqrt(2 ln(1.25/delta)) / epsilon`` bound, which only holds for epsilon < 1; it is also given as
:func:`classical_gaussian_epsilon` for reference).

Over rounds: each round is a fresh release computed from the same local data (the global model a site starts
from is post-processing of earlier releases), so rounds compose adaptively. *Simple composition* gives
``(R * epsilon, R * delta)`` after R rounds (:func:`compose_simple`, what the filter reports). The composition of
R ``mu``-GDP mechanisms is ``sqrt(R) mu``-GDP, which converts to a much smaller epsilon at the same delta
(:func:`compose_gdp`, reported alongside as the tight figure).

What this does NOT protect: the head parameters, the training-loss metrics, the sample count and the validation
metrics also leave the site and are not noised (a full DP guarantee for a site would need DP-SGD on the head as
well). The noise must be fresh and secret: never derive it from a seed shipped with the job, or the server could
subtract it. The centroids are used by cosine similarity everywhere, so only directions matter; ``C`` near the
centroids' typical norm (1 for the normalised centroids the trainer produces) wastes nothing by clipping.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.special import log_ndtr, ndtr


def clip_rows(centroids: torch.Tensor, clip: float) -> tuple[torch.Tensor, int]:
    """Every row scaled to L2 norm at most ``clip`` (rows inside the ball unchanged); and how many were scaled."""
    if not clip > 0:
        raise ValueError(f"clip norm must be > 0, got {clip}")
    x = centroids.detach().to(torch.float64)
    norms = x.norm(dim=1, keepdim=True)
    scale = torch.clamp(clip / norms.clamp_min(1e-300), max=1.0)
    return (x * scale).to(centroids.dtype), int((norms > clip).sum())


def fresh_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's entropy (never from the job's configuration)."""
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return gen


def privatize_centroids(centroids: torch.Tensor, clip: float, noise_multiplier: float,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """``clip_C(M) + N(0, (noise_multiplier * clip)^2)`` per coordinate; returns (released matrix, rows clipped).

    ``generator`` None: fresh OS entropy (:func:`fresh_generator`); pass a seeded one only for experiments.
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    clipped, num_clipped = clip_rows(centroids, clip)
    if noise_multiplier == 0:
        return clipped, num_clipped
    gen = generator if generator is not None else fresh_generator()
    noise = torch.randn(clipped.shape, generator=gen, dtype=torch.float64) * (noise_multiplier * clip)
    return (clipped.to(torch.float64) + noise).to(centroids.dtype), num_clipped


def l2_sensitivity(num_clusters: int, clip: float) -> float:
    """``2 C sqrt(K)``: the largest Frobenius distance between two clipped K-row centroid matrices."""
    return 2.0 * clip * math.sqrt(num_clusters)


def gdp_mu(num_clusters: int, noise_multiplier: float) -> float:
    """``mu = Delta_2 / (sigma C) = 2 sqrt(K) / sigma`` of one release (inf without noise)."""
    return math.inf if noise_multiplier <= 0 else 2.0 * math.sqrt(num_clusters) / noise_multiplier


def gaussian_delta(mu: float, epsilon: float) -> float:
    """Smallest delta for which a ``mu``-GDP (Gaussian) mechanism is (epsilon, delta)-DP (Balle & Wang, Thm. 8)."""
    if math.isinf(mu):
        return 1.0
    a, b = mu / 2 - epsilon / mu, -mu / 2 - epsilon / mu
    return max(0.0, float(ndtr(a)) - math.exp(epsilon + float(log_ndtr(b))))


def gaussian_epsilon(mu: float, delta: float, tol: float = 1e-10) -> float:
    """Smallest epsilon >= 0 with ``gaussian_delta(mu, epsilon) <= delta`` (bisection; inf without noise)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2
        if hi > 1e12:
            return math.inf
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if gaussian_delta(mu, mid) <= delta else (mid, hi)
    return hi


def classical_gaussian_epsilon(sensitivity: float, noise_std: float, delta: float) -> float:
    """``Delta sqrt(2 ln(1.25/delta)) / s`` (Dwork & Roth Thm. A.1; a valid guarantee only when it is < 1)."""
    return math.inf if noise_std <= 0 else sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / noise_std


def compose_simple(epsilon: float, delta: float, rounds: int) -> tuple[float, float]:
    """Basic composition of ``rounds`` (epsilon, delta)-DP releases: ``(rounds * epsilon, rounds * delta)``."""
    return rounds * epsilon, rounds * delta


def compose_gdp(mu: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` ``mu``-GDP releases (``sqrt(rounds) * mu``-GDP; tight)."""
    return gaussian_epsilon(math.sqrt(rounds) * mu, delta)


@dataclass(frozen=True)
class PrivacyAccount:
    """The (epsilon, delta) of releasing clipped, noised centroids ``rounds`` times (see the module doc)."""

    num_clusters: int
    clip: float
    noise_multiplier: float
    noise_std: float  # per coordinate: noise_multiplier * clip
    sensitivity: float  # Delta_2 = 2 C sqrt(K)
    mu: float  # per round, GDP
    delta: float  # per round
    epsilon: float  # per round, analytic Gaussian mechanism
    rounds: int
    total_epsilon: float  # simple composition: rounds * epsilon
    total_delta: float  # simple composition: rounds * delta
    total_epsilon_gdp: float  # tight: sqrt(rounds) * mu -GDP at total_delta

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"sensitivity 2*C*sqrt(K)={self.sensitivity:.4g} (K={self.num_clusters}, C={self.clip:g}), "
                f"noise std {self.noise_std:.4g}; per round (epsilon={_fmt(self.epsilon)}, delta={self.delta:g}); "
                f"after {self.rounds} round(s) (epsilon={_fmt(self.total_epsilon)}, delta={self.total_delta:g}) "
                f"by simple composition [GDP composition: epsilon={_fmt(self.total_epsilon_gdp)}]")


DEFAULT_DELTA = 1e-5  # per-round delta of the accounting unless a site's filter or the job says otherwise


def account(num_clusters: int, clip: float, noise_multiplier: float, delta: float = DEFAULT_DELTA,
            rounds: int = 1) -> PrivacyAccount:
    """Privacy of ``rounds`` releases of a K-row centroid matrix clipped to ``clip`` with the given noise."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    mu = gdp_mu(num_clusters, noise_multiplier)
    eps = gaussian_epsilon(mu, delta)
    total_eps, total_delta = compose_simple(eps, delta, rounds)
    return PrivacyAccount(
        num_clusters=num_clusters, clip=clip, noise_multiplier=noise_multiplier, noise_std=noise_multiplier * clip,
        sensitivity=l2_sensitivity(num_clusters, clip), mu=mu, delta=delta, epsilon=eps, rounds=rounds,
        total_epsilon=total_eps, total_delta=total_delta,
        total_epsilon_gdp=compose_gdp(mu, rounds, total_delta) if total_delta < 1 else 0.0,
    )


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4g}"


# ------------------------------------------------------------------------------------------- a site's release


def check_noise_settings(clip: float, noise_multiplier: float, delta: float) -> None:
    """ValueError unless ``clip > 0``, ``noise_multiplier >= 0`` and ``0 < delta < 1``."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def release_centroids(value, clip: float, noise_multiplier: float):
    """``(released, rows clipped)``: ``value`` (a torch tensor or a numpy array) through
    :func:`privatize_centroids`, released as the same type and dtype."""

    as_numpy = isinstance(value, np.ndarray)
    centroids = torch.from_numpy(np.ascontiguousarray(value)) if as_numpy else value.detach().cpu()
    released, num_clipped = privatize_centroids(centroids.float(), clip, noise_multiplier)
    released = released.to(centroids.dtype)
    return (released.numpy() if as_numpy else released), num_clipped


def describe_release(num_rows: int, num_clipped: int, clip: float, noise_multiplier: float, delta: float,
                     release: int, rounds: int | None = None) -> str:
    """The audit line of a site's ``release``-th centroid release: clipping, noise, and the (epsilon, delta) per
    round, so far and, with ``rounds``, over the planned job (simple composition, :func:`account`)."""
    from .privacy import account

    text = (f"clip C={clip:g}, sigma={noise_multiplier:g}: {num_clipped}/{num_rows} rows clipped, "
            f"noise std {noise_multiplier * clip:g} per coordinate; ")
    if noise_multiplier <= 0:
        return text + f"release {release}: no noise, no DP guarantee (epsilon=inf)"
    so_far = account(num_rows, clip, noise_multiplier, delta, release)
    text += (f"release {release}: per round (epsilon={so_far.epsilon:.4g}, delta={delta:g}), "
             f"cumulative (epsilon={so_far.total_epsilon:.4g}, delta={so_far.total_delta:g}) by simple composition")
    if rounds:
        planned = account(num_rows, clip, noise_multiplier, delta, int(rounds))
        text += f"; all {rounds} rounds: (epsilon={planned.total_epsilon:.4g}, delta={planned.total_delta:g})"
    return text
