"""Server aggregation: FedAvg (W), FedCC-kmeans, FedCC-maximin, dispatch, order independence, screening.

Expected values are computed by hand in the comments.
"""

from __future__ import annotations

import itertools
import math
import random
import re

import numpy as np
import pytest
import torch

from fuss_components import aggregation as agg
from fuss_components.aggregation import (
    AggregationError,
    ClientUpdate,
    aggregate,
    average_centroids,
    average_states,
    fedavg,
    fedavg_weights,
    fedcc_kmeans,
    fedcc_maximin,
    normalize_rows,
    screen_updates,
)
from fuss_components.config import FederationConfig


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ FedAvg


def test_fedavg_weights_weighted_and_uniform():
    # N = 1 + 3 = 4 -> alpha = (1/4, 3/4); uniform -> (1/2, 1/2)
    assert fedavg_weights([1, 3], weighted=True).tolist() == [0.25, 0.75]
    assert fedavg_weights([1, 3], weighted=False).tolist() == [0.5, 0.5]
    w = fedavg_weights([1, 3, 4], weighted=True)
    assert w.dtype == np.float64
    assert w.tolist() == [0.125, 0.375, 0.5]
    with pytest.raises(ValueError):
        fedavg_weights([], weighted=True)
    with pytest.raises(ValueError):
        fedavg_weights([1, 0], weighted=True)


STATE_A = {"w": t(1.0, 2.0), "b": t(0.0)}  # N = 1
STATE_B = {"w": t(3.0, 6.0), "b": t(4.0)}  # N = 3
STATE_C = {"w": t(5.0, -2.0), "b": t(8.0)}  # N = 4


def test_average_states_two_clients_weighted_vs_uniform():
    # weighted (1/4, 3/4): w = (0.25*1 + 0.75*3, 0.25*2 + 0.75*6) = (2.5, 5.0); b = 0.75*4 = 3.0
    out = average_states([STATE_A, STATE_B], fedavg_weights([1, 3], True))
    assert out["w"].tolist() == [2.5, 5.0]
    assert out["b"].tolist() == [3.0]
    assert out["w"].dtype == torch.float32
    # uniform (1/2, 1/2): w = (2, 4); b = 2
    out = average_states([STATE_A, STATE_B], fedavg_weights([1, 3], False))
    assert out["w"].tolist() == [2.0, 4.0]
    assert out["b"].tolist() == [2.0]


def test_average_states_three_clients_weighted_vs_uniform():
    # N = 1 + 3 + 4 = 8, alpha = (1/8, 3/8, 1/2):
    #   w0 = 1/8 + 9/8 + 5/2 = 3.75; w1 = 2/8 + 18/8 - 1 = 1.5; b = 0 + 12/8 + 4 = 5.5
    out = average_states([STATE_A, STATE_B, STATE_C], fedavg_weights([1, 3, 4], True))
    assert out["w"].tolist() == pytest.approx([3.75, 1.5], abs=1e-6)
    assert out["b"].tolist() == pytest.approx([5.5], abs=1e-6)
    # uniform: w = (9/3, 6/3) = (3, 2); b = 12/3 = 4
    out = average_states([STATE_A, STATE_B, STATE_C], fedavg_weights([1, 3, 4], False))
    assert out["w"].tolist() == pytest.approx([3.0, 2.0], abs=1e-6)
    assert out["b"].tolist() == pytest.approx([4.0], abs=1e-6)


def test_average_states_key_and_shape_mismatch_name_the_key():
    with pytest.raises(ValueError, match="'b'"):
        average_states([{"w": t(1.0), "b": t(1.0)}, {"w": t(1.0), "c": t(1.0)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="'w'.*\\(3,\\).*\\(2,\\)"):
        average_states([{"w": t(1.0, 2.0)}, {"w": t(1.0, 2.0, 3.0)}], [0.5, 0.5])


def test_average_states_accumulates_in_float64():
    # float32 accumulation of 1e8 + 1 - 1e8 loses the 1 (ulp(1e8) = 8 in float32); float64 keeps it.
    states = [{"x": t(1e8)}, {"x": t(1.0)}, {"x": t(-1e8)}]
    out = average_states(states, [1.0, 1.0, 1.0])
    assert out["x"].item() == pytest.approx(1.0 / 3.0, rel=1e-6)


def test_average_centroids_index_wise_normalised():
    # rows are normalised first: a -> [(1,0), (0,1)], b -> [(0,1), (1,0)]; alpha = (1/4, 3/4)
    # row0 = (0.25, 0.75) -> (1, 3)/sqrt(10); row1 = (0.75, 0.25) -> (3, 1)/sqrt(10)
    a = t([2.0, 0.0], [0.0, 1.0])
    b = t([0.0, 3.0], [0.5, 0.0])
    out = average_centroids([a, b], [0.25, 0.75])
    s = math.sqrt(10.0)
    assert out.tolist() == [pytest.approx([1 / s, 3 / s]), pytest.approx([3 / s, 1 / s])]
    # plain Eq. 9 without normalisation: row0 = (0.5, 2.25), row1 = (0.375, 0.25)
    raw = average_centroids([a, b], [0.25, 0.75], normalize=False)
    assert raw.tolist() == [[0.5, 2.25], [0.375, 0.25]]
    with pytest.raises(ValueError):
        average_centroids([a, t([1.0, 0.0])], [0.5, 0.5])


def test_normalize_rows_unit_and_zero_safe():
    x = t([3.0, 4.0], [0.0, 0.0])
    out = normalize_rows(x)
    assert out.tolist() == [pytest.approx([0.6, 0.8], abs=1e-7), [0.0, 0.0]]
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ FedCC-kmeans

# Two obvious clusters in 3-D, spread over 3 clients, with row norms != 1 (normalisation must happen first).
# Normalised members near e1: (1,0,0), (.96,0,.28), (.96,.28,0) -> sum (2.92, .28, .28)
# Normalised members near e2: (0,1,0), (0,.96,.28), (.28,.96,0) -> sum (.28, 2.92, .28)
# Both sums have norm sqrt(2.92^2 + 2 * .28^2) = sqrt(8.6832); the mean's direction is the sum's direction.
KM_SETS = {
    "a": t([2.0, 0.0, 0.0], [0.0, 1.0, 0.0]),
    "b": t([0.96, 0.0, 0.28], [0.0, 2.88, 0.84]),
    "c": t([0.48, 0.14, 0.0], [0.28, 0.96, 0.0]),
}
_KM_NORM = math.sqrt(8.6832)
KM_E1 = [2.92 / _KM_NORM, 0.28 / _KM_NORM, 0.28 / _KM_NORM]
KM_E2 = [0.28 / _KM_NORM, 2.92 / _KM_NORM, 0.28 / _KM_NORM]


def _rows_by_axis(c: torch.Tensor) -> tuple[list[float], list[float]]:
    i1 = int(torch.argmax(c[:, 0]))
    return c[i1].tolist(), c[1 - i1].tolist()


def test_fedcc_kmeans_two_clusters_hand_means():
    out = fedcc_kmeans(list(KM_SETS.values()), k=2, seed=0, n_init=10)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    r1, r2 = _rows_by_axis(out)
    assert r1 == pytest.approx(KM_E1, abs=1e-6)
    assert r2 == pytest.approx(KM_E2, abs=1e-6)
    assert torch.linalg.vector_norm(out, dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_fedcc_kmeans_seeded_reproducible_and_k_too_large():
    g = torch.Generator().manual_seed(3)
    sets = [torch.randn(5, 8, generator=g) for _ in range(4)]
    a = fedcc_kmeans(sets, k=5, seed=7, n_init=3)
    b = fedcc_kmeans(sets, k=5, seed=7, n_init=3)
    assert torch.equal(a, b)
    assert torch.linalg.vector_norm(a, dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-6)
    with pytest.raises(ValueError, match="larger than the pool"):
        fedcc_kmeans(sets, k=21, seed=0)


# ------------------------------------------------------------------------------------------------ FedCC-maximin

# Pool (already unit, split over 2 clients): p0=(1,0) p1=(0,1) p2=(-1,0) | p3=(.6,.8) p4=(0,-1)
MM_SETS = [t([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]), t([0.6, 0.8], [0.0, -1.0])]
MM_POOL = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]


def test_fedcc_maximin_hand_order_seed1():
    # default_rng(1).integers(5) = 2 -> first p2 = (-1, 0).
    # dist (1 - cos) to p2: p0 2, p1 1, p3 1.6, p4 1                     -> p0
    # min with p0 (p1 1, p3 .4, p4 1): p1 1, p3 .4, p4 1; tie p1/p4       -> p1 (lowest index)
    # min with p1 (p3 .2, p4 2): p3 .2, p4 1                              -> p4, then p3
    assert int(np.random.default_rng(1).integers(5)) == 2
    out = fedcc_maximin(MM_SETS, k=5, seed=1)
    order = [2, 0, 1, 4, 3]
    assert out.tolist() == [pytest.approx(MM_POOL[i], abs=1e-6) for i in order]
    assert fedcc_maximin(MM_SETS, k=3, seed=1).tolist() == [pytest.approx(MM_POOL[i], abs=1e-6) for i in order[:3]]


def test_fedcc_maximin_hand_order_seed4_and_normalises():
    # default_rng(4).integers(5) = 3 -> first p3 = (.6, .8).
    # dist to p3: p0 .4, p1 .2, p2 1.6, p4 1.8                           -> p4
    # min with p4 (p0 1, p1 2, p2 1): p0 .4, p1 .2, p2 1                 -> p2
    # min with p2 (p0 2, p1 1): p0 .4, p1 .2                             -> p0, then p1
    assert int(np.random.default_rng(4).integers(5)) == 3
    scaled = [MM_SETS[0] * 3.0, MM_SETS[1] * 0.5]  # norms must not matter
    out = fedcc_maximin(scaled, k=4, seed=4)
    assert out.tolist() == [pytest.approx(MM_POOL[i], abs=1e-6) for i in [3, 4, 2, 0]]


def test_fedcc_maximin_k_too_large_and_reproducible():
    with pytest.raises(ValueError, match="larger than the pool"):
        fedcc_maximin(MM_SETS, k=6, seed=0)
    g = torch.Generator().manual_seed(1)
    sets = [torch.randn(4, 6, generator=g) for _ in range(3)]
    assert torch.equal(fedcc_maximin(sets, 4, seed=5), fedcc_maximin(sets, 4, seed=5))


# ------------------------------------------------------------------------------------------------ aggregate


def _update(site, head, centroids, n):
    return ClientUpdate(site=site, head=head, centroids=centroids, num_samples=n)


def test_aggregate_fedavg_dispatch_hand_values():
    ups = [
        _update("b", STATE_B, t([0.0, 3.0], [0.5, 0.0]), 3),
        _update("a", STATE_A, t([2.0, 0.0], [0.0, 1.0]), 1),
    ]
    cfg = FederationConfig(aggregator="fedavg", weighted=True)
    head, cent = aggregate(ups, cfg, num_clusters=2)
    assert head["w"].tolist() == [2.5, 5.0] and head["b"].tolist() == [3.0]  # see two-client test
    s = math.sqrt(10.0)
    assert cent.tolist() == [pytest.approx([1 / s, 3 / s]), pytest.approx([3 / s, 1 / s])]
    # uniform: head w = (2, 4); centroids row0 = (.5, .5) -> (1, 1)/sqrt2
    head, cent = aggregate(ups, FederationConfig(aggregator="fedavg", weighted=False), num_clusters=2)
    assert head["w"].tolist() == [2.0, 4.0]
    r = 1 / math.sqrt(2.0)
    assert cent.tolist() == [pytest.approx([r, r]), pytest.approx([r, r])]
    # E and C are client-side switches: the server result does not change
    off = FederationConfig(aggregator="fedavg", weighted=False, average_head=False, aggregate_centroids=False)
    head2, cent2 = aggregate(ups, off, num_clusters=2)
    assert torch.equal(head2["w"], head["w"]) and torch.equal(cent2, cent)


def test_aggregate_fedcc_kmeans_dispatch():
    heads = {"a": STATE_A, "b": STATE_B, "c": STATE_C}
    ns = {"a": 1, "b": 3, "c": 4}
    ups = [_update(s, heads[s], KM_SETS[s], ns[s]) for s in ("c", "a", "b")]
    head, cent = aggregate(ups, FederationConfig(aggregator="fedcc-kmeans", weighted=True), num_clusters=2)
    # head = weighted FedAvg (three-client test): w = (3.75, 1.5), b = 5.5
    assert head["w"].tolist() == pytest.approx([3.75, 1.5], abs=1e-6)
    assert head["b"].tolist() == pytest.approx([5.5], abs=1e-6)
    r1, r2 = _rows_by_axis(cent)
    assert r1 == pytest.approx(KM_E1, abs=1e-6) and r2 == pytest.approx(KM_E2, abs=1e-6)


def test_aggregate_passes_seed_and_n_init(monkeypatch):
    calls = []

    def fake_kmeans(sets, k, seed, n_init=10):
        calls.append(("kmeans", [s.tolist() for s in sets], k, seed, n_init))
        return torch.zeros(k, 2)

    def fake_maximin(sets, k, seed):
        calls.append(("maximin", [s.tolist() for s in sets], k, seed))
        return torch.ones(k, 2)

    monkeypatch.setattr(agg, "fedcc_kmeans", fake_kmeans)
    monkeypatch.setattr(agg, "fedcc_maximin", fake_maximin)
    ups = [_update("z", STATE_B, MM_SETS[1], 2), _update("y", STATE_A, MM_SETS[1] * 2, 1)]
    sorted_sets = [(MM_SETS[1] * 2).tolist(), MM_SETS[1].tolist()]  # y before z
    _, c = aggregate(ups, FederationConfig(aggregator="fedcc-kmeans", seed=11, kmeans_n_init=4), num_clusters=2)
    assert calls[-1] == ("kmeans", sorted_sets, 2, 11, 4) and c.tolist() == [[0, 0], [0, 0]]
    _, c = aggregate(ups, FederationConfig(aggregator="fedcc-maximin", seed=12), num_clusters=2)
    assert calls[-1] == ("maximin", sorted_sets, 2, 12) and c.tolist() == [[1, 1], [1, 1]]


def test_aggregate_fedcc_maximin_dispatch_matches_direct_call_on_sorted_sites():
    ups = [
        _update("site-b", STATE_B, MM_SETS[1], 3),
        _update("site-a", STATE_A, MM_SETS[0][:2], 1),
    ]
    cfg = FederationConfig(aggregator="fedcc-maximin", seed=4)
    head, cent = aggregate(ups, cfg, num_clusters=2)
    # sorted: site-a [p0, p1] then site-b [p3, p4]; pool indices 0..3; rng(4).integers(4) picks the first
    expected = fedcc_maximin([MM_SETS[0][:2], MM_SETS[1]], 2, seed=4)
    assert torch.equal(cent, expected)
    assert head["w"].tolist() == [2.5, 5.0]


def test_aggregate_errors():
    cfg = FederationConfig(aggregator="fedavg")
    with pytest.raises(AggregationError):
        aggregate([], cfg, num_clusters=2)
    dup = [_update("a", STATE_A, MM_SETS[1], 1), _update("a", STATE_B, MM_SETS[1], 1)]
    with pytest.raises(AggregationError, match="'a'"):
        aggregate(dup, cfg, num_clusters=2)
    bad = [_update("a", STATE_A, MM_SETS[1], 1), _update("b", STATE_B, MM_SETS[0], 1)]
    with pytest.raises(AggregationError, match="'b'.*\\(3, 2\\)"):
        aggregate(bad, cfg, num_clusters=2)


def test_aggregate_order_independent_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    ups = []
    for i, site in enumerate(["s0", "s1", "s2", "s3", "s4"]):
        head = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
        ups.append(_update(site, head, torch.randn(3, 4, generator=g), 10 + 7 * i))
    # A key whose float64 sum depends on the summation order: 1e16 + 1 - 1e16 (ulp(1e16) = 2 in float64).
    for u, v in zip(ups, [1e16, 1.0, -1e16, 3.0, 1.0]):
        u.head["x"] = t(v)
    base = [ups[0].head, ups[1].head, ups[2].head]
    assert not torch.equal(  # the probe really is order-sensitive without sorting
        average_states(base, [1, 1, 1])["x"], average_states([base[0], base[2], base[1]], [1, 1, 1])["x"]
    )
    rng = random.Random(0)
    for name in ("fedavg", "fedcc-kmeans", "fedcc-maximin"):
        cfg = FederationConfig(aggregator=name, seed=3, kmeans_n_init=2)
        ref_head, ref_cent = aggregate(ups, cfg, num_clusters=3)
        perms = list(itertools.permutations(ups))
        for perm in rng.sample(perms, 6) + [tuple(reversed(ups))]:
            head, cent = aggregate(list(perm), cfg, num_clusters=3)
            assert head.keys() == ref_head.keys()
            for key in ref_head:
                assert torch.equal(head[key], ref_head[key]), (name, key)
            assert torch.equal(cent, ref_cent), name


def test_fedavg_convenience_matches_aggregate():
    ups = [_update("b", STATE_B, t([0.0, 3.0], [0.5, 0.0]), 3), _update("a", STATE_A, t([2.0, 0.0], [0.0, 1.0]), 1)]
    head, cent = fedavg(ups, weighted=True)
    head2, cent2 = aggregate(ups, FederationConfig(aggregator="fedavg"), num_clusters=2)
    assert torch.equal(head["w"], head2["w"]) and torch.equal(cent, cent2)


# ------------------------------------------------------------------------------------------------ screening

REF = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}


def _clean(site, scale=1.0, n=5):
    return ClientUpdate(
        site=site,
        head={"w": torch.full((2, 3), 0.1 * scale), "b": torch.full((2,), 0.1 * scale)},
        centroids=torch.ones(4, 3),
        num_samples=n,
    )


def _screen(updates, **kw):
    return screen_updates(updates, REF, num_clusters=4, dim=3, **kw)


def test_screen_accepts_clean_updates():
    ups = [_clean("s1"), _clean("s2", 2.0), _clean("s3", 0.5)]
    accepted, rejected = _screen(ups)
    assert [u.site for u in accepted] == ["s1", "s2", "s3"] and rejected == []


def _faulty(kind):
    u = _clean("bad")
    if kind == "missing_key":
        del u.head["b"]
    elif kind == "unexpected_key":
        u.head["extra"] = torch.zeros(1)
    elif kind == "shape":
        u.head["w"] = torch.zeros(3, 2)
    elif kind == "nan_head":
        u.head["w"][0, 1] = float("nan")
    elif kind == "inf_centroids":
        u.centroids[2, 0] = float("inf")
    elif kind == "nan_centroids":
        u.centroids[0, 0] = float("nan")
    elif kind == "num_clusters":
        u.centroids = torch.ones(5, 3)
    elif kind == "dim":
        u.centroids = torch.ones(4, 2)
    elif kind == "n_zero":
        u.num_samples = 0
    elif kind == "n_negative":
        u.num_samples = -3
    elif kind == "n_float":
        u.num_samples = 2.5
    elif kind == "n_none":
        u.num_samples = None
    elif kind == "n_str":
        u.num_samples = "10"
    elif kind == "n_missing":
        del u.num_samples
    return u


FAULTS = {
    "missing_key": r"missing \['b'\]",
    "unexpected_key": r"unexpected \['extra'\]",
    "shape": r"head\['w'\] has shape \(3, 2\), expected \(2, 3\)",
    "nan_head": r"head\['w'\] contains NaN",
    "inf_centroids": r"centroids contain NaN or Inf",
    "nan_centroids": r"centroids contain NaN or Inf",
    "num_clusters": r"centroids have shape \(5, 3\), expected \(4, 3\)",
    "dim": r"centroids have shape \(4, 2\), expected \(4, 3\)",
    "n_zero": r"num_samples must be > 0",
    "n_negative": r"num_samples must be > 0",
    "n_float": r"num_samples must be an integer",
    "n_none": r"num_samples is missing",
    "n_str": r"num_samples must be an integer",
    "n_missing": r"num_samples is missing",
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_screen_rejects_each_fault_naming_site(kind):
    ups = [_clean("s1"), _faulty(kind), _clean("s2")]
    accepted, rejected = _screen(ups)
    assert [u.site for u in accepted] == ["s1", "s2"]
    assert len(rejected) == 1
    site, reason = rejected[0]
    assert site == "bad" and "'bad'" in reason
    assert re.search(FAULTS[kind], reason), reason


def test_screen_rejects_later_duplicates():
    first, second, third = _clean("s1"), _clean("s1", 2.0), _clean("s1", 3.0)
    accepted, rejected = _screen([first, _clean("s2"), second, third])
    assert len(accepted) == 2 and accepted[0] is first and accepted[1].site == "s2"
    assert [s for s, _ in rejected] == ["s1", "s1"]
    assert all("'s1'" in r and "duplicated" in r for _, r in rejected)


def test_screen_norm_outlier_only_with_three_clients():
    # distances from REF: 0.1*scale*sqrt(8); median of (1, 1.2, 1e4)*0.1*sqrt(8) is 1.2*0.1*sqrt(8);
    # the outlier is 1e4/1.2 = 8333 x the median > 1e3.
    ups = [_clean("s1"), _clean("s2", 1.2), _clean("huge", 1e4)]
    accepted, rejected = _screen(ups)
    assert [u.site for u in accepted] == ["s1", "s2"]
    assert rejected[0][0] == "huge" and "'huge'" in rejected[0][1] and "median" in rejected[0][1]
    # a higher limit accepts it
    accepted, rejected = _screen(ups, norm_ratio_limit=1e4)
    assert len(accepted) == 3 and rejected == []
    # with only two clients the median test is off
    accepted, rejected = _screen([_clean("s1"), _clean("huge", 1e4)])
    assert len(accepted) == 2 and rejected == []
