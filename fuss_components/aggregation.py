"""Server-side aggregation of FUSS client updates (paper Algorithm 1, Eq. 8-12) as pure functions.

Only the projection head's parameters, the centroids and the sample count of each client travel. The server

* averages the head index-wise (FedAvg, Eq. 8) with weights ``alpha_k = N_k / N`` (switch W on) or ``1 / |K|``;
* aggregates the centroids with one of

  - ``"fedavg"`` (Eq. 9): index-wise weighted average of the clients' (row-normalised) centroids;
  - ``"fedcc-kmeans"`` (Eq. 10, 11): k-means with ``|C|`` clusters on the L2-normalised pool of all clients'
    centroids, the re-normalised cluster means are the new centroids;
  - ``"fedcc-maximin"`` (Eq. 12): seeded first pick from the normalised pool, then repeatedly the pool member
    farthest (cosine distance) from everything already picked.

The switches E (``average_head``) and C (``aggregate_centroids``) are applied on the client: a client with a
switch off keeps its own head / centroids instead of loading the global ones. The server always computes the
aggregate (it is the global model that is evaluated and checkpointed).

Unlike the authors' code this module never touches the backbone or a linear probe (only the head state it is
given), weights by sample counts, takes ``|C|`` from the caller, normalises centroids before FedCC, seeds k-means
and maximin, and makes the result independent of the order in which updates arrive (they are sorted by site
name before any floating-point summation or pooling).

Screening (``screening.screen_updates``) is the one place where client updates are checked: what a client sends is
untrusted until it passes, and every rejection names the site instead of stopping the round. Everything after it
(:func:`aggregate`, :func:`average_states`, :func:`average_centroids`, FedCC) assumes screened input and keeps only
cheap asserts against a wrong call.

Robust mode (``FederationConfig.robust``, off by default): ``"median"`` / ``"trimmed-mean"`` replace the head's
FedAvg by an unweighted coordinate-wise median / trimmed mean (:func:`robust_average_states`), so one client can
neither drag a coordinate arbitrarily far nor buy influence with an inflated sample count; ``"clip"`` keeps the
weighted FedAvg but first shortens every head's change from the global head to the median change of the round
(:func:`clipped_average_states`), so no client moves the model further than a typical one. Screening rejects an
update whose centroids are an outlier among 3 or more (``screening.centroid_outliers``) in every mode. The centroid rule
itself (FedAvg / FedCC) is unchanged and runs on what is accepted.

No FLARE import: the FLARE aggregator and the in-process runner both call :func:`aggregate`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fuss_components.config import FederationConfig

__all__ = [
    "AggregationError",
    "ClientUpdate",
    "aggregate",
    "average_centroids",
    "average_states",
    "centroid_drift",
    "clipped_average_states",
    "fedavg",
    "fedavg_weights",
    "fedcc_kmeans",
    "fedcc_maximin",
    "matched_cosines",
    "normalize_rows",
    "robust_average_states",
    "trimmed_count",
]

EPS = 1e-12  # floor of a norm or a spread before dividing by it


class AggregationError(RuntimeError):
    """The server cannot aggregate this round (e.g. no accepted update)."""


@dataclass
class ClientUpdate:
    """What one client returns after a round of local training.

    ``head``: the projection head's ``state_dict()`` (float32, CPU); ``centroids``: ``(C, D)`` tensor, not
    necessarily normalised; ``num_samples``: N_k, the number of local training samples (images, not batches);
    ``metrics``: declared scalar metrics (loss values, ...), passed through untouched.
    """

    site: str
    head: dict[str, torch.Tensor]
    centroids: torch.Tensor  # (C, D)
    num_samples: int
    metrics: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- FedAvg


def fedavg_weights(num_samples: Sequence[int], weighted: bool) -> np.ndarray:
    """The client weights of every FedAvg average (float64, summing to 1): the one place they are computed.

    ``weighted=True`` (switch W): ``alpha_k = N_k / sum_j N_j``; ``weighted=False``: ``alpha_k = 1 / |K|``.
    Each weight is the true quotient of two Python integers (exact sum, correctly rounded division), so no count
    can overflow float64 or round a weight to zero the way ``float(N_k)`` sums would. Raises ``ValueError`` for an
    empty sequence or (when weighted) a count that is not a positive integer (``screening.screen_updates`` rejects
    such updates first).
    """
    counts = list(num_samples)
    if not counts:
        raise ValueError("fedavg_weights: no clients")
    if not weighted:
        return np.full(len(counts), 1.0 / len(counts), dtype=np.float64)
    for i, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
            raise ValueError(f"fedavg_weights: sample count #{i} must be a positive integer, got {n!r}")
    exact = [int(n) for n in counts]
    total = sum(exact)
    return np.array([n / total for n in exact], dtype=np.float64)


def _normalised(weights: Any, n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    # zip() would silently drop the inputs or weights beyond the shorter list
    assert w.shape[0] == n, f"{w.shape[0]} weights for {n} inputs"
    assert np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0, f"unusable weights {w.tolist()}"
    return w / w.sum()


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Any) -> dict[str, torch.Tensor]:
    """Index-wise weighted average of screened state dicts (paper Eq. 8).

    Every state has the keys and shapes of the first and only finite floating-point tensors (what
    ``screening.screen_updates`` guarantees). ``weights`` are normalised to sum 1. Tensors are accumulated in
    float64, in the given order, and returned as float32 on the CPU. Callers that need order independence sort first
    (:func:`aggregate` does).
    """
    assert len(states) > 0, "average_states: no states"
    w = _normalised(weights, len(states))
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for wi, state in zip(w, states):
            value = state[key]
            assert value.shape == first.shape, f"key {key!r}: shape {tuple(value.shape)} != {tuple(first.shape)}"
            acc += float(wi) * value.detach().to(device="cpu", dtype=torch.float64)
        out[key] = acc.to(torch.float32).contiguous()
    return out


def normalize_rows(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """L2-normalise the rows (last dimension) of ``x``; a zero row stays zero instead of becoming NaN."""
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norms.clamp_min(eps)


def trimmed_count(n: int, trim_fraction: float) -> int:
    """How many values the trimmed mean cuts at EACH end of ``n``: ``ceil(trim_fraction * n)``, at most
    ``(n - 1) // 2`` (at least one value stays). 0.2 of 3 clients cuts 1 (= the median), of 12 cuts 3."""
    if n < 1:
        raise ValueError("trimmed_count: no values")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trimmed_count: trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    return min(math.ceil(trim_fraction * n - 1e-9), (n - 1) // 2)


def robust_average_states(
    states: Sequence[Mapping[str, torch.Tensor]], mode: str, trim_fraction: float = 0.2
) -> dict[str, torch.Tensor]:
    """Unweighted coordinate-wise robust average of screened state dicts (same input as :func:`average_states`).

    ``mode="median"``: per coordinate the median of the ``n`` values (even ``n``: mean of the two middle ones);
    ``mode="trimmed-mean"``: per coordinate the mean of the values left after dropping the
    :func:`trimmed_count` smallest and largest. Values are sorted per coordinate (float64) before anything is
    summed, so the result does not depend on the order of ``states``, bit for bit. Float32 result on the CPU.
    Sample counts are ignored on purpose: an inflated count must not buy influence.
    """
    if mode not in ("median", "trimmed-mean"):
        raise ValueError(f"robust_average_states: mode must be 'median' or 'trimmed-mean', got {mode!r}")
    n = len(states)
    assert n > 0, "robust_average_states: no states"
    if mode == "median":
        lo, hi = (n - 1) // 2, n // 2
    else:
        k = trimmed_count(n, trim_fraction)
        lo, hi = k, n - 1 - k
    out: dict[str, torch.Tensor] = {}
    for key in states[0]:
        stacked = torch.stack([s[key].detach().to(device="cpu", dtype=torch.float64) for s in states])
        ordered = stacked.sort(dim=0).values[lo:hi + 1]
        out[key] = (ordered.sum(dim=0) / ordered.shape[0]).to(torch.float32).contiguous()
    return out


def clipped_average_states(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Any, reference: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Weighted average of screened state dicts after norm clipping of their changes from ``reference``.

    Each state's change ``d_k = state_k - reference`` (L2 norm over all its tensors together) is scaled down to
    ``tau = median_k ||d_k||`` (even count: mean of the two middle norms) when it is longer; shorter changes are
    kept. The result is ``reference + sum_k w_k d_k`` with ``weights`` normalised to sum 1 (the FedAvg weights).
    One client can then move the model at most as far as the median client, whatever the length or sign of its
    change. Float64 arithmetic in the given order (:func:`aggregate` sorts first), float32 result on the CPU.
    """
    assert len(states) > 0, "clipped_average_states: no states"
    w = _normalised(weights, len(states))
    keys = list(states[0])
    assert set(reference) == set(keys), "clipped_average_states: reference keys differ from the states'"
    ref = {k: reference[k].detach().to(device="cpu", dtype=torch.float64) for k in keys}
    deltas = [{k: s[k].detach().to(device="cpu", dtype=torch.float64) - ref[k] for k in keys} for s in states]
    norms = [math.sqrt(sum(float((d[k] ** 2).sum()) for k in keys)) for d in deltas]
    tau = float(np.median(norms))
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        acc = ref[key].clone()
        for wi, delta, norm in zip(w, deltas, norms):
            scale = tau / norm if norm > tau else 1.0
            acc += float(wi) * scale * delta[key]
        out[key] = acc.to(torch.float32).contiguous()
    return out


def average_centroids(sets: Sequence[torch.Tensor], weights: Any, normalize: bool = True) -> torch.Tensor:
    """Index-wise weighted average of centroid sets (paper Eq. 9): row c of the result averages row c of each set.

    All sets have the same shape ``(C, D)``. With ``normalize=True`` (default) each client's rows are
    L2-normalised before averaging and the averaged rows re-normalised: centroids are only ever used through
    cosine similarity, so a client whose centroids happen to have larger norms must not dominate the direction.
    ``normalize=False`` is the plain Eq. 9 average. Float64 accumulation, float32 result.
    """
    assert len(sets) > 0, "average_centroids: no centroid sets"
    w = _normalised(weights, len(sets))
    acc = torch.zeros(sets[0].shape, dtype=torch.float64)
    for wi, s in zip(w, sets):
        # broadcasting would silently spread a (1, D) set over every row
        assert s.shape == sets[0].shape, f"centroid sets of shapes {tuple(s.shape)} and {tuple(sets[0].shape)}"
        s64 = s.detach().to(device="cpu", dtype=torch.float64)
        acc += float(wi) * (normalize_rows(s64) if normalize else s64)
    if normalize:
        acc = normalize_rows(acc)
    return acc.to(torch.float32).contiguous()


def fedavg(updates: Sequence[ClientUpdate], weighted: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """FedAvg of heads and centroids (Eq. 8, 9) over ``updates``, sorted by site first; returns (head, centroids)."""
    ordered = _sorted_updates(updates)
    w = fedavg_weights([u.num_samples for u in ordered], weighted)
    return average_states([u.head for u in ordered], w), average_centroids([u.centroids for u in ordered], w)


# --------------------------------------------------------------------------------------------------- FedCC


def _normalised_pool(sets: Sequence[torch.Tensor], k: int, what: str) -> np.ndarray:
    pool = torch.cat([s.detach().to(device="cpu", dtype=torch.float64) for s in sets], dim=0)
    if k > pool.shape[0]:
        raise ValueError(f"{what}: k={k} is larger than the pool of {pool.shape[0]} centroids")
    return normalize_rows(pool).numpy()


def fedcc_kmeans(sets: Sequence[torch.Tensor], k: int, seed: int, n_init: int = 10) -> torch.Tensor:
    """FedCC with k-means (paper Eq. 10, 11).

    Pools all clients' centroids (``|K|*|C| x D``), L2-normalises every row, runs scikit-learn ``KMeans`` with
    ``n_clusters=k``, ``n_init`` restarts and ``random_state=seed``, and returns the mean of the normalised pool
    members of each cluster, re-normalised to unit length: a float32 ``(k, D)`` tensor. A cluster left empty by
    the final assignment (only possible with duplicated pool rows) falls back to k-means' own centre.
    The result depends on the order of ``sets`` only through k-means' seeded initialisation; pass them in a
    fixed order (``aggregate`` sorts by site). Raises ``ValueError`` if ``k`` exceeds the pool size.
    """
    from sklearn.cluster import KMeans

    pool = _normalised_pool(sets, k, "fedcc_kmeans")
    km = KMeans(n_clusters=int(k), n_init=int(n_init), random_state=int(seed)).fit(pool)
    labels = km.labels_
    centres = np.empty((int(k), pool.shape[1]), dtype=np.float64)
    for j in range(int(k)):
        members = pool[labels == j]
        centres[j] = members.mean(axis=0) if len(members) else km.cluster_centers_[j]
    return normalize_rows(torch.from_numpy(centres)).to(torch.float32).contiguous()


def fedcc_maximin(sets: Sequence[torch.Tensor], k: int, seed: int) -> torch.Tensor:
    """FedCC with maximin (farthest-point) selection (paper Eq. 12).

    From the L2-normalised pool of all clients' centroids, the first centroid is the pool member at index
    ``numpy.random.default_rng(seed).integers(pool_size)``; then, until ``k`` are picked, the not yet picked
    member whose minimum cosine distance ``1 - cos`` to the picked ones is largest (exact ties: lowest index).
    Returns the picked normalised rows, in picking order, as a float32 ``(k, D)`` tensor. Raises ``ValueError``
    if ``k`` exceeds the pool size.
    """
    pool = _normalised_pool(sets, k, "fedcc_maximin")
    n = pool.shape[0]
    rng = np.random.default_rng(int(seed))
    first = int(rng.integers(n))
    picked = [first]
    available = np.ones(n, dtype=bool)
    available[first] = False
    min_dist = 1.0 - pool @ pool[first]
    while len(picked) < int(k):
        candidates = np.where(available, min_dist, -np.inf)
        nxt = int(np.argmax(candidates))  # argmax returns the first (lowest) index among exact ties
        picked.append(nxt)
        available[nxt] = False
        min_dist = np.minimum(min_dist, 1.0 - pool @ pool[nxt])
    return torch.from_numpy(pool[picked].copy()).to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------------- aggregate


def _sorted_updates(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    if len(updates) == 0:
        raise AggregationError("no client update to aggregate")
    # two updates of one site would silently count it twice
    assert len({u.site for u in updates}) == len(updates), "duplicated site: screen the updates first"
    return sorted(updates, key=lambda u: u.site)


def aggregate(
    updates: Sequence[ClientUpdate], cfg: FederationConfig, num_clusters: int,
    reference_head: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One server aggregation step on screened updates; returns ``(global head state, global centroids
    (num_clusters, D))``.

    ``updates`` are what ``screening.screen_updates`` accepted: one per site, heads with the reference's keys and
    shapes, finite float tensors, centroids ``(num_clusters, D)``, positive integer sample counts. They are sorted
    by site name first, so the result does not depend on their arrival order.

    * Head: FedAvg (Eq. 8) with weights from :func:`fedavg_weights` (``cfg.weighted``, switch W); FedCC uses
      FedAvg for the head too. With ``cfg.robust`` ``"median"`` / ``"trimmed-mean"`` the head is
      :func:`robust_average_states` instead (unweighted; ``cfg.trim_fraction``); with ``"clip"`` it is
      :func:`clipped_average_states` around ``reference_head`` (the global head the clients started from, required
      in that mode) with the FedAvg weights.
    * Centroids by ``cfg.aggregator``: ``"fedavg"`` -> :func:`average_centroids` with the same weights;
      ``"fedcc-kmeans"`` -> :func:`fedcc_kmeans` (seed ``cfg.seed``, ``n_init=cfg.kmeans_n_init``);
      ``"fedcc-maximin"`` -> :func:`fedcc_maximin` (seed ``cfg.seed``).

    The switches E (``cfg.average_head``) and C (``cfg.aggregate_centroids``) are NOT applied here: they are
    enforced client-side (a client with a switch off keeps its own head / centroids). The server computes the
    aggregate regardless, because the global model is what is evaluated and checkpointed.

    Raises :class:`AggregationError` when there is no update, ``ValueError`` for an unknown aggregator or robust
    mode (a config built without ``validate()``) or for ``"clip"`` without ``reference_head``.
    """
    ordered = _sorted_updates(updates)
    weights = fedavg_weights([u.num_samples for u in ordered], cfg.weighted)
    heads = [u.head for u in ordered]
    if cfg.robust == "none":
        head = average_states(heads, weights)
    elif cfg.robust in ("median", "trimmed-mean"):
        head = robust_average_states(heads, cfg.robust, cfg.trim_fraction)
    elif cfg.robust == "clip":
        if reference_head is None:
            raise ValueError("robust mode 'clip' needs reference_head (the global head the clients started from)")
        head = clipped_average_states(heads, weights, reference_head)
    else:
        raise ValueError(f"unknown robust mode {cfg.robust!r}")
    sets = [u.centroids for u in ordered]
    if cfg.aggregator == "fedavg":
        centroids = average_centroids(sets, weights)
    elif cfg.aggregator == "fedcc-kmeans":
        centroids = fedcc_kmeans(sets, num_clusters, seed=cfg.seed, n_init=cfg.kmeans_n_init)
    elif cfg.aggregator == "fedcc-maximin":
        centroids = fedcc_maximin(sets, num_clusters, seed=cfg.seed)
    else:
        raise ValueError(f"unknown aggregator {cfg.aggregator!r}")
    return head, centroids


# --------------------------------------------------------------------------------------------------- drift


def matched_cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Cosines of the rows of ``a`` to the rows of ``b`` after matching them one to one so that the summed cosine is
    largest (Hungarian): ``(C,)`` float64, in the row order of ``a``. Centroid ids are arbitrary across sites and
    across FedCC rounds, so only a matched comparison says whether two sets describe the same clusters."""
    from scipy.optimize import linear_sum_assignment

    cos = (normalize_rows(a.detach().cpu().double()) @ normalize_rows(b.detach().cpu().double()).T).numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return cos[rows, cols]


def centroid_drift(updates: Sequence[ClientUpdate], cfg: FederationConfig, num_clusters: int) -> dict[str, float]:
    """How far the sites' centroids have drifted apart in a round, and what that does to the two centroid rules:

    ``site_indexwise_mean``   mean over site pairs and centroid ids of the cosine of centroid c of one site to
                              centroid c of the other (what FedAvg's index-wise average assumes is high);
    ``site_matched_mean``     the same after matching the two sets one to one (:func:`matched_cosines`);
    ``site_matched_min``      the smallest matched cosine of any pair: the worst-matched cluster;
    ``fedavg_fedcc_mean``     mean matched cosine between this round's FedAvg centroids (Eq. 9) and FedCC's
                              (the configured FedCC rule; k-means when the job aggregates with FedAvg);
    ``fedavg_fedcc_min``      its smallest matched cosine.

    ``site_indexwise_mean`` well below ``site_matched_mean`` means the sites' centroid ids no longer correspond
    (FedCC's premise); both near 1 means FedAvg and FedCC must agree. Needs two or more updates for the site
    terms (absent otherwise). Cost: one FedCC aggregation and C x C Hungarian matches per site pair."""
    ordered = _sorted_updates(updates)
    sets = [u.centroids for u in ordered]
    out: dict[str, float] = {}
    if len(sets) >= 2:
        indexwise, matched, worst = [], [], 1.0
        for i in range(len(sets)):
            for j in range(i + 1, len(sets)):
                a, b = normalize_rows(sets[i].double()), normalize_rows(sets[j].double())
                indexwise.append(float((a * b).sum(dim=1).mean()))
                cos = matched_cosines(a, b)
                matched.append(float(cos.mean()))
                worst = min(worst, float(cos.min()))
        out.update(site_indexwise_mean=float(np.mean(indexwise)), site_matched_mean=float(np.mean(matched)),
                   site_matched_min=worst)
    weights = fedavg_weights([u.num_samples for u in ordered], cfg.weighted)
    averaged = average_centroids(sets, weights)
    if cfg.aggregator == "fedcc-maximin":
        clustered = fedcc_maximin(sets, num_clusters, seed=cfg.seed)
    else:
        clustered = fedcc_kmeans(sets, num_clusters, seed=cfg.seed, n_init=cfg.kmeans_n_init)
    cos = matched_cosines(averaged, clustered)
    out.update(fedavg_fedcc_mean=float(cos.mean()), fedavg_fedcc_min=float(cos.min()))
    return out
