"""Screening of client updates: the one place where what a client sends is checked before any aggregation.

Every rejection names the site and the reason instead of stopping the round: a count that is not a whole number
within what the site declared, heads or centroids of the wrong keys, shapes or values, a change from the global
model beyond the round's bound (:func:`change_bound`), and centroids that are an outlier among the round's
updates (:func:`centroid_outliers`). :func:`screen_updates` returns the accepted updates for
``fuss_components.aggregation.aggregate``. No FLARE import.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fuss_components.aggregation import EPS, ClientUpdate, normalize_rows
from fuss_components.config import FederationConfig

# A centroid row shorter than this has no usable direction: normalize_rows clamps norms at EPS, so such a row
# would not become a unit vector and would silently drop out of every cosine comparison.
MIN_CENTROID_ROW_NORM = 1e-6


def _tensor_problem(value: Any, what: str, shape: tuple[int, ...], plural: bool = False) -> str | None:
    """Why ``value`` cannot enter an average as ``what`` of ``shape``, or None."""
    is_, has, contains = ("are", "have", "contain") if plural else ("is", "has", "contains")
    if not isinstance(value, torch.Tensor):
        return f"{what} {is_} not a tensor ({type(value).__name__})"
    if value.layout != torch.strided:
        return f"{what} {is_} a {value.layout} tensor, expected a dense one"
    # integer / bool tensors cannot be averaged, complex ones have no place in the model
    if not torch.is_floating_point(value):
        return f"{what} {has} dtype {value.dtype}, expected a floating-point dtype"
    if tuple(value.shape) != shape:
        return f"{what} {has} shape {tuple(value.shape)}, expected {shape}"
    if not bool(torch.isfinite(value).all()):
        return f"{what} {contains} NaN or Inf"
    return None


def _count_problem(n: Any, declared: Any, has_declared: bool, max_samples: int) -> str | None:
    """Why ``num_samples`` ``n`` cannot weight an average, or None. ``declared``: what the site declared when the
    job started (only checked when ``has_declared``)."""
    if n is None:
        return "num_samples is missing"
    # floats are refused even when whole: 1e308 is "whole" and would zero every other client's weight
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        return f"num_samples must be an integer, got {type(n).__name__} {n!r}"
    n = int(n)
    if n <= 0:
        return f"num_samples must be > 0, got {n}"
    if n > max_samples:
        return f"num_samples {n} exceeds federation.max_samples={max_samples}"
    if has_declared:
        if isinstance(declared, bool) or not isinstance(declared, numbers.Integral):
            return f"did not declare a usable sample count when the job started (declared {declared!r})"
        if n > int(declared):
            return f"num_samples {n} exceeds the {int(declared)} it declared when the job started"
    return None


def _head_problem(head: Any, reference_head: Mapping[str, torch.Tensor]) -> str | None:
    if not isinstance(head, Mapping):
        return f"head must be a dict of tensors, got {type(head).__name__}"
    ref_keys, keys = set(reference_head), set(head)
    if keys != ref_keys:
        return (
            f"head key set differs from the global head: missing {sorted(ref_keys - keys, key=str)}, "
            f"unexpected {sorted(keys - ref_keys, key=str)}"
        )
    for key in sorted(ref_keys):
        problem = _tensor_problem(head[key], f"head[{key!r}]", tuple(reference_head[key].shape))
        if problem is not None:
            return problem
    return None


def _centroid_problem(c: Any, num_clusters: int, dim: int, max_norm: float) -> str | None:
    problem = _tensor_problem(c, "centroids", (num_clusters, dim), plural=True)
    if problem is not None:
        return problem
    norms = torch.linalg.vector_norm(c.detach().to(device="cpu", dtype=torch.float64), dim=1)
    short = int((norms < MIN_CENTROID_ROW_NORM).sum())
    if short == num_clusters:
        return "centroids are all zero"
    if short:
        return f"{short} centroid row(s) are zero (norm < {MIN_CENTROID_ROW_NORM:g}), without a direction"
    longest = float(norms.max())
    if not longest <= max_norm:
        return f"a centroid row has norm {longest:.4g}, more than federation.max_centroid_norm={max_norm:g}"
    return None


def _flat64(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().to(device="cpu", dtype=torch.float64).reshape(-1) for k in keys])


def change_bound(fed: FederationConfig, steps: int | None) -> float:
    """The largest relative head change accepted from a round of ``steps`` local steps: an honest head drifts
    about with sqrt(steps) (measured on camvid: 0.41 after 250 steps, 0.86 after 1,000, 1.47 after 3,000), so the
    bound is ``federation.max_relative_change`` up to ``federation.relative_change_steps`` steps and grows with
    sqrt(steps / relative_change_steps) beyond (None: no growth)."""
    if not steps or steps <= fed.relative_change_steps:
        return fed.max_relative_change
    return fed.max_relative_change * math.sqrt(steps / fed.relative_change_steps)


def _screen_one(u: Any, site: str, reference: torch.Tensor, reference_head: Mapping[str, torch.Tensor],
                num_clusters: int, dim: int, fed: FederationConfig,
                declared_counts: Mapping[str, int] | None,
                round_steps: Mapping[str, int] | None = None) -> tuple[str | None, float]:
    """(why the update ``u`` of ``site`` must be rejected or None, its head's distance to the reference).

    ``reference``: ``reference_head`` flattened to float64 in sorted key order."""
    has_declared = declared_counts is not None
    if has_declared and site not in declared_counts:
        return "did not declare a sample count when the job started", math.nan
    problem = (
        _count_problem(getattr(u, "num_samples", None), declared_counts.get(site) if has_declared else None,
                       has_declared, fed.max_samples)
        or _head_problem(getattr(u, "head", None), reference_head)
        or _centroid_problem(getattr(u, "centroids", None), num_clusters, dim, fed.max_centroid_norm)
    )
    if problem is not None:
        return problem, math.nan
    flat = _flat64(u.head, sorted(reference_head))
    distance = float(torch.linalg.vector_norm(flat - reference))
    reference_norm = float(torch.linalg.vector_norm(reference))
    if reference_norm > 0:  # an all-zero reference has no scale to be relative to
        steps = (round_steps or {}).get(site)
        bound = change_bound(fed, steps)
        change = distance / reference_norm
        if not change <= bound:  # also catches a NaN / Inf distance
            detail = f" for a round of {steps} local steps" if bound != fed.max_relative_change else ""
            return (f"head moved {change:.4g} x the global head's norm from it, more than {bound:.4g}{detail} "
                    f"(federation.max_relative_change={fed.max_relative_change:g})"), distance
        # an honest head keeps its direction however long it trains (its drift is about orthogonal to it); a
        # sign-flipped one points away from the global head
        cosine = float(flat @ reference) / (float(torch.linalg.vector_norm(flat)) * reference_norm + EPS)
        if not cosine > 0:
            return f"head points away from the global head (cosine {cosine:.3g})", distance
    return None, distance


def centroid_outliers(updates: Sequence[ClientUpdate], ratio_limit: float) -> list[tuple[str, str]]:
    """Screening's centroid check: ``(site, reason)`` for every update whose centroids are an outlier.

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
    if median <= EPS:
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
    declared_counts: Mapping[str, int] | None = None,
    reject_all_duplicates: bool = False,
    round_steps: Mapping[str, int] | None = None,
) -> tuple[list[ClientUpdate], list[tuple[str, str]]]:
    """Split ``updates`` into (accepted, rejected); each rejection is ``(site, reason)`` and the reason names the site.

    The one screening layer between what clients send and :func:`aggregate`. An update is rejected when

    * its site name is not a non-empty string, or repeats an earlier update's (later duplicates are rejected; with
      ``reject_all_duplicates=True`` every update of a repeated name is: the server cannot tell the genuine one,
      and keeping the first to arrive would make the result depend on arrival order);
    * ``num_samples`` is not a positive integer (bool, float, str, None, ``<= 0``), exceeds
      ``federation.max_samples``, or, with ``declared_counts`` (site -> the sample count it declared when the job
      started), exceeds what the site declared; a site missing from ``declared_counts`` is rejected;
    * its head's key set differs from ``reference_head`` (missing / unexpected keys named), or a head tensor is
      not a dense floating-point tensor (integer, bool, complex dtypes refused), has another shape than the
      reference's, or holds NaN/Inf;
    * its centroids are not a dense finite floating-point ``(num_clusters, dim)`` tensor, are all zero or have a
      zero row (no direction to compare by cosine), or have a row norm above ``federation.max_centroid_norm``;
    * its head moved from ``reference_head`` (the current global head) by more than :func:`change_bound` times
      the reference's norm (L2 norms of the whole parameter vector; ``round_steps``: site -> the local steps of its
      round, which the server derives from the job's configuration and the count the site declared; works with
      any number of clients; skipped for an all-zero reference, which has no scale), or points away from it
      (cosine <= 0: a sign flip, at any number of steps);
    * at least 3 updates passed all of the above and its head moved more than ``norm_ratio_limit`` times their
      median distance from the reference (skipped when that median is 0);
    * at least 3 updates remain and its centroids are an outlier (:func:`centroid_outliers` with
      ``federation.centroid_outlier_ratio``), whenever the sites started from the same global centroids (switch C
      on) and in every robust mode: random centroids from one poisoned client of three cost 1.7 mIoU on CamVid
      when kept, 0.7 (its images) when rejected (``docs/reliability.md``).

    ``federation`` None uses the defaults of :class:`FederationConfig`. Any other error while looking at one
    update rejects that update (reason named) instead of stopping the round. Pure: nothing is logged or raised;
    the caller logs the rejections and decides whether enough clients remain (and raises
    ``AggregationError`` if none does). Accepted updates keep their input order and satisfy everything
    ``aggregation.aggregate`` assumes.
    """
    fed = federation if federation is not None else FederationConfig()
    reference = _flat64(reference_head, sorted(reference_head))
    accepted: list[ClientUpdate] = []
    distances: list[float] = []
    rejected: list[tuple[str, str]] = []
    seen: set[str] = set()
    names = [getattr(u, "site", None) for u in updates]
    repeated = {n for n in names if isinstance(n, str) and names.count(n) > 1} if reject_all_duplicates else set()
    for u, site in zip(updates, names):
        if not isinstance(site, str) or not site:
            rejected.append((str(site), f"site {site!r}: site name must be a non-empty string"))
            continue
        if site in repeated:
            rejected.append((site, f"site {site!r}: duplicated site name ({names.count(site)} updates claim it; "
                                   f"all are rejected)"))
            continue
        if site in seen:
            rejected.append((site, f"site {site!r}: duplicated site name (an earlier update from it was received)"))
            continue
        seen.add(site)
        try:
            reason, distance = _screen_one(u, site, reference, reference_head, num_clusters, dim, fed,
                                           declared_counts, round_steps)
        except Exception as err:  # a hostile object must cost its own update, never the round
            reason, distance = f"update could not be screened ({type(err).__name__}: {err})", math.nan
        if reason is not None:
            rejected.append((site, f"site {site!r}: {reason}"))
        else:
            accepted.append(u)
            distances.append(distance)
    if len(accepted) >= 3:
        median = float(np.median(distances))
        if median > 0:
            kept = []
            for u, d in zip(accepted, distances):
                if d > norm_ratio_limit * median:
                    rejected.append(
                        (
                            u.site,
                            f"site {u.site!r}: head moved {d:.4g} from the global head, more than "
                            f"{norm_ratio_limit:g} x the median {median:.4g} over {len(distances)} clients",
                        )
                    )
                else:
                    kept.append(u)
            accepted = kept
    # comparable centroids: the sites started the round from the same global centroids (switch C on), or a robust
    # mode asks for the check anyway
    if len(accepted) >= 3 and (fed.aggregate_centroids or fed.robust != "none"):
        outliers = centroid_outliers(accepted, fed.centroid_outlier_ratio)
        if outliers:
            out_sites = {site for site, _ in outliers}
            accepted = [u for u in accepted if u.site not in out_sites]
            rejected.extend(outliers)
    return accepted, rejected
