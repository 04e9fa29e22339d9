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

Robust mode (``FederationConfig.robust``, off by default): ``"median"`` / ``"trimmed-mean"`` replace the head's
FedAvg by an unweighted coordinate-wise median / trimmed mean (:func:`robust_average_states`), so one client can
neither drag a coordinate arbitrarily far nor buy influence with an inflated sample count; and
:func:`screen_updates` (given the federation config) rejects an update whose centroids are an outlier
(:func:`centroid_outliers`). The centroid rule itself (FedAvg / FedCC) is unchanged and runs on what is accepted.

No FLARE import: the FLARE aggregator and the in-process runner both call :func:`aggregate`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fuss_components.config import AGGREGATORS, ROBUST_MODES, FederationConfig

__all__ = [
    "AggregationError",
    "ClientUpdate",
    "aggregate",
    "average_centroids",
    "average_states",
    "centroid_outliers",
    "fedavg",
    "fedavg_weights",
    "fedcc_kmeans",
    "fedcc_maximin",
    "normalize_rows",
    "robust_average_states",
    "screen_updates",
    "trimmed_count",
]

_EPS = 1e-12


class AggregationError(RuntimeError):
    """The server cannot aggregate this round (e.g. no accepted update, duplicated sites, mismatched shapes)."""


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
    """FedAvg client weights (float64, summing to 1).

    ``weighted=True`` (switch W): ``alpha_k = N_k / sum_j N_j``; ``weighted=False``: ``alpha_k = 1 / |K|``.
    Raises ``ValueError`` for an empty sequence or (when weighted) a sample count that is not a positive integer.
    """
    counts = list(num_samples)
    if not counts:
        raise ValueError("fedavg_weights: no clients")
    if not weighted:
        return np.full(len(counts), 1.0 / len(counts), dtype=np.float64)
    for i, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
            raise ValueError(f"fedavg_weights: sample count #{i} must be a positive integer, got {n!r}")
    arr = np.asarray(counts, dtype=np.float64)
    return arr / arr.sum()


def _check_weights(weights: Any, n: int, what: str) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"{what}: {w.shape[0]} weights for {n} inputs")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{what}: weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w / w.sum()


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Any) -> dict[str, torch.Tensor]:
    """Index-wise weighted average of state dicts (paper Eq. 8).

    Every state must have the same keys and, per key, the same shape (``ValueError`` naming the key otherwise).
    ``weights`` are normalised to sum 1 (non-negative, not all zero). Floating-point tensors are accumulated in
    float64, in the given order, and returned as float32 on the CPU. Non-floating tensors (counters) must be
    equal in every state and are returned unchanged. Callers that need order independence sort first
    (:func:`aggregate` does).
    """
    if len(states) == 0:
        raise ValueError("average_states: no states")
    w = _check_weights(weights, len(states), "average_states")
    keys = list(states[0].keys())
    key_set = set(keys)
    for i, state in enumerate(states[1:], start=1):
        other = set(state.keys())
        if other != key_set:
            missing = sorted(key_set - other)
            extra = sorted(other - key_set)
            name = (missing or extra)[0]
            raise ValueError(
                f"average_states: state #{i} key set differs from state #0 at key {name!r} "
                f"(missing {missing}, unexpected {extra})"
            )
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][key]
        for i, state in enumerate(states[1:], start=1):
            if tuple(state[key].shape) != tuple(first.shape):
                raise ValueError(
                    f"average_states: key {key!r} has shape {tuple(state[key].shape)} in state #{i} "
                    f"but {tuple(first.shape)} in state #0"
                )
        if not (torch.is_floating_point(first) or torch.is_complex(first)):
            for i, state in enumerate(states[1:], start=1):
                if not torch.equal(state[key].detach().cpu(), first.detach().cpu()):
                    raise ValueError(f"average_states: non-floating key {key!r} differs in state #{i}")
            out[key] = first.detach().cpu().clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for wi, state in zip(w, states):
            acc += float(wi) * state[key].detach().to(device="cpu", dtype=torch.float64)
        out[key] = acc.to(torch.float32).contiguous()
    return out


def normalize_rows(x: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
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
    """Unweighted coordinate-wise robust average of state dicts (same keys and shapes as :func:`average_states`).

    ``mode="median"``: per coordinate the median of the ``n`` values (even ``n``: mean of the two middle ones);
    ``mode="trimmed-mean"``: per coordinate the mean of the values left after dropping the
    :func:`trimmed_count` smallest and largest. Values are sorted per coordinate (float64) before anything is
    summed, so the result does not depend on the order of ``states``, bit for bit. Float32 result on the CPU;
    non-floating tensors must be equal in every state and are returned unchanged. Sample counts are ignored on
    purpose: an inflated count must not buy influence.
    """
    if mode not in ("median", "trimmed-mean"):
        raise ValueError(f"robust_average_states: mode must be 'median' or 'trimmed-mean', got {mode!r}")
    n = len(states)
    if n == 0:
        raise ValueError("robust_average_states: no states")
    average_states(states, [1.0] * n)  # the same key / shape / counter checks (and messages)
    if mode == "median":
        lo, hi = (n - 1) // 2, n // 2
    else:
        k = trimmed_count(n, trim_fraction)
        lo, hi = k, n - 1 - k
    out: dict[str, torch.Tensor] = {}
    for key in states[0]:
        first = states[0][key]
        if not (torch.is_floating_point(first) or torch.is_complex(first)):
            out[key] = first.detach().cpu().clone()
            continue
        stacked = torch.stack([s[key].detach().to(device="cpu", dtype=torch.float64) for s in states])
        ordered = stacked.sort(dim=0).values[lo:hi + 1]
        out[key] = (ordered.sum(dim=0) / ordered.shape[0]).to(torch.float32).contiguous()
    return out


def _check_sets(sets: Sequence[torch.Tensor], what: str) -> None:
    if len(sets) == 0:
        raise ValueError(f"{what}: no centroid sets")
    dims = set()
    for i, s in enumerate(sets):
        if not isinstance(s, torch.Tensor) or s.dim() != 2:
            raise ValueError(f"{what}: centroid set #{i} must be a 2-D tensor (C, D), got {getattr(s, 'shape', s)}")
        dims.add(int(s.shape[1]))
    if len(dims) != 1:
        raise ValueError(f"{what}: centroid sets have different dimensions D {sorted(dims)}")


def average_centroids(sets: Sequence[torch.Tensor], weights: Any, normalize: bool = True) -> torch.Tensor:
    """Index-wise weighted average of centroid sets (paper Eq. 9): row c of the result averages row c of each set.

    All sets must have the same shape ``(C, D)``. With ``normalize=True`` (default) each client's rows are
    L2-normalised before averaging and the averaged rows re-normalised: centroids are only ever used through
    cosine similarity, so a client whose centroids happen to have larger norms must not dominate the direction.
    ``normalize=False`` is the plain Eq. 9 average. Float64 accumulation, float32 result.
    """
    _check_sets(sets, "average_centroids")
    shapes = {tuple(s.shape) for s in sets}
    if len(shapes) != 1:
        raise ValueError(f"average_centroids: centroid sets have different shapes {sorted(shapes)}")
    w = _check_weights(weights, len(sets), "average_centroids")
    acc = torch.zeros(sets[0].shape, dtype=torch.float64)
    for wi, s in zip(w, sets):
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
    _check_sets(sets, what)
    pool = torch.cat([s.detach().to(device="cpu", dtype=torch.float64) for s in sets], dim=0)
    if not torch.isfinite(pool).all():
        raise ValueError(f"{what}: the centroid pool contains NaN or Inf")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{what}: k must be a positive integer, got {k!r}")
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
    sites = [u.site for u in updates]
    seen: set[str] = set()
    for site in sites:
        if site in seen:
            raise AggregationError(f"site {site!r} sent more than one update; screen updates first")
        seen.add(site)
    return sorted(updates, key=lambda u: u.site)


def aggregate(
    updates: Sequence[ClientUpdate], cfg: FederationConfig, num_clusters: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One server aggregation step; returns ``(global head state, global centroids (num_clusters, D))``.

    The updates are sorted by site name first, so the result does not depend on their arrival order.

    * Head: FedAvg (Eq. 8) with weights from :func:`fedavg_weights` (``cfg.weighted``, switch W); FedCC uses
      FedAvg for the head too. With ``cfg.robust`` ``"median"`` / ``"trimmed-mean"`` the head is
      :func:`robust_average_states` instead (unweighted; ``cfg.trim_fraction``).
    * Centroids by ``cfg.aggregator``: ``"fedavg"`` -> :func:`average_centroids` with the same weights;
      ``"fedcc-kmeans"`` -> :func:`fedcc_kmeans` (seed ``cfg.seed``, ``n_init=cfg.kmeans_n_init``);
      ``"fedcc-maximin"`` -> :func:`fedcc_maximin` (seed ``cfg.seed``).

    The switches E (``cfg.average_head``) and C (``cfg.aggregate_centroids``) are NOT applied here: they are
    enforced client-side (a client with a switch off keeps its own head / centroids). The server computes the
    aggregate regardless, because the global model is what is evaluated and checkpointed.

    Raises :class:`AggregationError` for no update, a duplicated site, or centroids whose shape is not
    ``(num_clusters, D)`` with one common D (run :func:`screen_updates` first to drop such updates), and
    ``ValueError`` for an unknown aggregator or mismatching head states.
    """
    if cfg.aggregator not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {cfg.aggregator!r}; expected one of {AGGREGATORS}")
    ordered = _sorted_updates(updates)
    dim = None
    for u in ordered:
        shape = tuple(u.centroids.shape)
        if len(shape) != 2 or shape[0] != num_clusters or (dim is not None and shape[1] != dim):
            expected = f"({num_clusters}, {dim if dim is not None else 'D'})"
            raise AggregationError(f"site {u.site!r}: centroids have shape {shape}, expected {expected}")
        dim = shape[1]
    weights = fedavg_weights([u.num_samples for u in ordered], cfg.weighted)
    robust = getattr(cfg, "robust", "none")
    if robust == "none":
        head = average_states([u.head for u in ordered], weights)
    elif robust in ROBUST_MODES:
        head = robust_average_states([u.head for u in ordered], robust, cfg.trim_fraction)
    else:
        raise ValueError(f"unknown robust mode {robust!r}; expected one of {ROBUST_MODES}")
    sets = [u.centroids for u in ordered]
    if cfg.aggregator == "fedavg":
        centroids = average_centroids(sets, weights)
    elif cfg.aggregator == "fedcc-kmeans":
        centroids = fedcc_kmeans(sets, num_clusters, seed=cfg.seed, n_init=cfg.kmeans_n_init)
    else:
        centroids = fedcc_maximin(sets, num_clusters, seed=cfg.seed)
    return head, centroids


# --------------------------------------------------------------------------------------------------- screening


def _screen_one(u: Any, reference_head: Mapping[str, torch.Tensor], num_clusters: int, dim: int) -> str | None:
    """Return why ``u`` must be rejected, or None."""
    n = getattr(u, "num_samples", None)
    if n is None:
        return "num_samples is missing"
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        return f"num_samples must be an integer, got {type(n).__name__} {n!r}"
    if n <= 0:
        return f"num_samples must be > 0, got {n}"
    head = getattr(u, "head", None)
    if not isinstance(head, Mapping):
        return f"head must be a dict of tensors, got {type(head).__name__}"
    ref_keys, keys = set(reference_head), set(head)
    if keys != ref_keys:
        return (
            f"head key set differs from the global head: missing {sorted(ref_keys - keys)}, "
            f"unexpected {sorted(keys - ref_keys)}"
        )
    for key in sorted(ref_keys):
        t = head[key]
        if not isinstance(t, torch.Tensor):
            return f"head[{key!r}] is not a tensor ({type(t).__name__})"
        if tuple(t.shape) != tuple(reference_head[key].shape):
            return f"head[{key!r}] has shape {tuple(t.shape)}, expected {tuple(reference_head[key].shape)}"
        if not torch.isfinite(t).all():
            return f"head[{key!r}] contains NaN or Inf"
    c = getattr(u, "centroids", None)
    if not isinstance(c, torch.Tensor):
        return f"centroids must be a tensor, got {type(c).__name__}"
    if tuple(c.shape) != (num_clusters, dim):
        return f"centroids have shape {tuple(c.shape)}, expected ({num_clusters}, {dim})"
    if not torch.isfinite(c).all():
        return "centroids contain NaN or Inf"
    return None


def _head_distance(head: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    total = 0.0
    for key in sorted(reference):
        a = head[key].detach().to(device="cpu", dtype=torch.float64)
        b = reference[key].detach().to(device="cpu", dtype=torch.float64)
        total += float(((a - b) ** 2).sum())
    return math.sqrt(total)


def centroid_outliers(updates: Sequence[ClientUpdate], ratio_limit: float) -> list[tuple[str, str]]:
    """Robust mode's centroid check: ``(site, reason)`` for every update whose centroids are an outlier.

    Each client's centroids are row-normalised (everything downstream uses cosine, so a norm-only change is
    harmless and ignored); ``M`` is the coordinate-wise median of those normalised sets over the clients, and
    ``d_k = ||normalize_rows(C_k) - M||_F`` is how far client k's centroids lie from it. An update with
    ``d_k > ratio_limit * median_k(d_k)`` is an outlier. Needs at least 3 updates (with 2 there is no majority)
    and a positive median distance; the result does not depend on the order of ``updates``.
    """
    if len(updates) < 3:
        return []
    sets = torch.stack([normalize_rows(u.centroids.detach().to(device="cpu", dtype=torch.float64)) for u in updates])
    middle = sets.median(dim=0).values if len(updates) % 2 else sets.sort(dim=0).values[
        len(updates) // 2 - 1:len(updates) // 2 + 1].mean(dim=0)
    dists = torch.linalg.vector_norm((sets - middle).flatten(1), dim=1).tolist()
    median = float(np.median(dists))
    if median <= _EPS:
        return []
    return [
        (u.site, f"site {u.site!r}: centroids lie {d:.4g} from the clients' median centroids, more than "
                 f"{ratio_limit:g} x the median distance {median:.4g} over {len(dists)} clients")
        for u, d in zip(updates, dists)
        if d > ratio_limit * median
    ]


def screen_updates(
    updates: Sequence[ClientUpdate],
    reference_head: Mapping[str, torch.Tensor],
    num_clusters: int,
    dim: int,
    norm_ratio_limit: float = 1e3,
    *,
    federation: FederationConfig | None = None,
    reject_all_duplicates: bool = False,
) -> tuple[list[ClientUpdate], list[tuple[str, str]]]:
    """Split ``updates`` into (accepted, rejected); each rejection is ``(site, reason)`` and the reason names the site.

    An update is rejected when its site name repeats an earlier update's (later duplicates are rejected),
    ``num_samples`` is missing, not an integer or ``<= 0``, its head's key set differs from ``reference_head``
    (missing / unexpected keys named), a head tensor's shape differs (key and both shapes named), a head or
    centroid value is NaN/Inf, or its centroids are not ``(num_clusters, dim)``. Then, if at least 3 updates
    remain, one whose head moved from ``reference_head`` by more than ``norm_ratio_limit`` times the median
    distance (L2 norm of the whole parameter-vector difference) is rejected; skipped when that median is 0.

    With ``federation`` in a robust mode (``federation.robust`` not ``"none"``), the updates that passed all of
    the above then go through :func:`centroid_outliers` with ``federation.centroid_outlier_ratio``.

    ``reject_all_duplicates=True`` rejects EVERY update of a site name that occurs more than once (the server
    cannot tell the genuine one, and keeping the first to arrive would make the result depend on arrival order);
    the default keeps the first and rejects the later ones.

    Pure: nothing is logged or raised; the caller logs the rejections and decides whether enough clients remain
    (and raises :class:`AggregationError` if none does). Accepted updates keep their input order.
    """
    accepted: list[ClientUpdate] = []
    rejected: list[tuple[str, str]] = []
    seen: set[Any] = set()
    names = [getattr(u, "site", None) for u in updates]
    repeated = {n for n in names if isinstance(n, str) and names.count(n) > 1} if reject_all_duplicates else set()
    for u in updates:
        site = getattr(u, "site", None)
        label = str(site)
        if not isinstance(site, str) or not site:
            rejected.append((label, f"site {site!r}: site name must be a non-empty string"))
            continue
        if site in repeated:
            rejected.append((site, f"site {site!r}: duplicated site name ({names.count(site)} updates claim it; "
                                   f"all are rejected)"))
            continue
        if site in seen:
            rejected.append((site, f"site {site!r}: duplicated site name (an earlier update from it was received)"))
            continue
        seen.add(site)
        reason = _screen_one(u, reference_head, num_clusters, dim)
        if reason is not None:
            rejected.append((site, f"site {site!r}: {reason}"))
        else:
            accepted.append(u)
    if len(accepted) >= 3:
        dists = [_head_distance(u.head, reference_head) for u in accepted]
        median = float(np.median(dists))
        if median > 0:
            kept = []
            for u, d in zip(accepted, dists):
                if d > norm_ratio_limit * median:
                    rejected.append(
                        (
                            u.site,
                            f"site {u.site!r}: head moved {d:.4g} from the global head, more than "
                            f"{norm_ratio_limit:g} x the median {median:.4g} over {len(dists)} clients",
                        )
                    )
                else:
                    kept.append(u)
            accepted = kept
    if federation is not None and getattr(federation, "robust", "none") != "none":
        outliers = centroid_outliers(accepted, federation.centroid_outlier_ratio)
        if outliers:
            out_sites = {site for site, _ in outliers}
            accepted = [u for u in accepted if u.site not in out_sites]
            rejected.extend(outliers)
    return accepted, rejected
