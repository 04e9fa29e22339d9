"""Server aggregation: FedAvg (W), FedCC-kmeans, FedCC-maximin, dispatch, order independence, robust modes, and
the screening layer in front of them (every hostile update rejected, naming its site).

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
    clipped_average_states,
    fedavg,
    fedavg_weights,
    fedcc_kmeans,
    fedcc_maximin,
    normalize_rows,
    robust_average_states,
    trimmed_count,
)
from fuss_components.screening import centroid_outliers, change_bound, screen_updates
from fuss_components.config import ConfigError, FederationConfig, FussConfig


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


def test_fedavg_weights_are_exact_quotients_of_python_ints():
    # float(10**400) overflows and 1e308 + 1e308 is inf; the integer quotient is exact and correctly rounded
    assert fedavg_weights([10**400, 3 * 10**400], weighted=True).tolist() == [0.25, 0.75]
    w = fedavg_weights([2**63 - 1, 1], weighted=True)
    assert w.sum() == pytest.approx(1.0) and w[1] > 0
    assert fedavg_weights([np.int64(1), np.int64(3)], weighted=True).tolist() == [0.25, 0.75]
    with pytest.raises(ValueError):
        fedavg_weights([1e308, 1e308], weighted=True)  # floats are not sample counts


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


def test_average_states_asserts_against_silent_garbage():
    # screening guarantees keys and shapes; what would broadcast or be dropped silently still asserts
    with pytest.raises(AssertionError, match="'w'"):
        average_states([{"w": t(1.0, 2.0)}, {"w": t(1.0)}], [0.5, 0.5])
    with pytest.raises(AssertionError, match="3 weights for 2 inputs"):
        average_states([STATE_A, STATE_B], [0.2, 0.3, 0.5])


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
    with pytest.raises(AssertionError):
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
    # unscreened input is a programming error: what would silently double-count or broadcast asserts
    dup = [_update("a", STATE_A, MM_SETS[1], 1), _update("a", STATE_B, MM_SETS[1], 1)]
    with pytest.raises(AssertionError, match="screen"):
        aggregate(dup, cfg, num_clusters=2)
    bad = [_update("a", STATE_A, MM_SETS[1], 1), _update("b", STATE_B, MM_SETS[1][:1], 1)]
    with pytest.raises(AssertionError):
        aggregate(bad, cfg, num_clusters=2)
    with pytest.raises(ValueError, match="aggregator"):
        aggregate(dup[:1], FederationConfig(aggregator="krum"), num_clusters=2)  # built without validate()


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


# ------------------------------------------------------------------------------------------------ order independence


def _random_updates(n=6, clusters=3, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(f"s{i}", {"w": torch.randn(5, 3, generator=g), "b": torch.randn(5, generator=g)},
                     torch.randn(clusters, dim, generator=g), 3 + 5 * i)
        for i in range(n)
    ]


def _equal_states(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("robust", ["none", "median", "trimmed-mean", "clip"])
@pytest.mark.parametrize("aggregator", ["fedavg", "fedcc-kmeans", "fedcc-maximin"])
def test_aggregation_does_not_depend_on_arrival_order(aggregator, robust):
    ups = _random_updates()
    cfg = FederationConfig(aggregator=aggregator, robust=robust, seed=2, kmeans_n_init=2)
    global_head = {k: torch.full_like(v, 0.1) for k, v in ups[0].head.items()}  # only "clip" reads it
    ref_head, ref_cent = aggregate(ups, cfg, num_clusters=3, reference_head=global_head)
    rng = random.Random(1)
    for _ in range(8):
        shuffled = ups[:]
        rng.shuffle(shuffled)
        head, cent = aggregate(shuffled, cfg, num_clusters=3, reference_head=global_head)
        assert _equal_states(head, ref_head) and torch.equal(cent, ref_cent)


def test_screening_with_duplicates_does_not_depend_on_arrival_order():
    ups = [_honest(f"s{i}", i, 3 + i) for i in range(5)]
    impostor = ClientUpdate("s2", {k: v * 1.01 for k, v in ups[2].head.items()}, ups[2].centroids.clone(), 9)
    results = set()
    for perm in itertools.permutations(ups + [impostor]):
        accepted, rejected = screen_updates(list(perm), REF, CLUSTERS, DIM, reject_all_duplicates=True)
        results.add((tuple(sorted(u.site for u in accepted)), tuple(sorted(s for s, _ in rejected))))
    assert results == {(("s0", "s1", "s3", "s4"), ("s2", "s2"))}


# ------------------------------------------------------------------------------------------------ robust modes


def test_trimmed_count_hand_values():
    # ceil(0.2 n), at most (n - 1) // 2
    assert [trimmed_count(n, 0.2) for n in (1, 2, 3, 4, 5, 6, 10, 12)] == [0, 0, 1, 1, 1, 2, 2, 3]
    assert [trimmed_count(n, 0.0) for n in (1, 5, 12)] == [0, 0, 0]
    assert trimmed_count(12, 0.49) == 5 and trimmed_count(4, 0.49) == 1
    with pytest.raises(ValueError):
        trimmed_count(4, 0.5)


def test_robust_average_states_hand_values():
    # one coordinate per key; values per client listed in column order
    states = [{"a": t(1.0, -2.0)}, {"a": t(2.0, 10.0)}, {"a": t(100.0, 0.0)}, {"a": t(4.0, 1.0)},
              {"a": t(3.0, -1000.0)}]
    # column 0 sorted: 1 2 3 4 100 -> median 3; trimmed (k=1 at 0.2): mean(2, 3, 4) = 3
    # column 1 sorted: -1000 -2 0 1 10 -> median 0; trimmed: mean(-2, 0, 1) = -1/3
    med = robust_average_states(states, "median")
    assert torch.allclose(med["a"], t(3.0, 0.0))
    trim = robust_average_states(states, "trimmed-mean", 0.2)
    assert torch.allclose(trim["a"], t(3.0, -1.0 / 3.0))
    # k = ceil(0.4 * 5) = 2: only the middle value remains = the median
    assert torch.allclose(robust_average_states(states, "trimmed-mean", 0.4)["a"], med["a"])
    # trim 0: the plain unweighted mean (1+2+100+4+3)/5 = 22, (-2+10+0+1-1000)/5 = -198.2
    assert torch.allclose(robust_average_states(states, "trimmed-mean", 0.0)["a"], t(22.0, -198.2))
    # even count: mean of the two middle values: first four, column 0: 1 2 4 100 -> 3; column 1: -2 0 1 10 -> 0.5
    assert torch.allclose(robust_average_states(states[:4], "median")["a"], t(3.0, 0.5))
    with pytest.raises(ValueError, match="mode"):
        robust_average_states(states, "mean")


def test_robust_head_bounds_one_poisoned_client_while_fedavg_does_not():
    """Five honest heads around 1.0 and one pushed to 2.4 (relative change 1.4 from the reference 1.0: under the
    screening limit 1.5, so it is accepted)."""
    honest = [1.0, 1.1, 0.9, 1.05, 0.95]
    ups = [ClientUpdate(f"h{i}", {"w": torch.full((2, 2), v)}, torch.eye(2), 10) for i, v in enumerate(honest)]
    ups.append(ClientUpdate("evil", {"w": torch.full((2, 2), 2.4)}, torch.eye(2), 10))
    accepted, rejected = screen_updates(ups, {"w": torch.ones(2, 2)}, 2, 2)
    assert len(accepted) == 6 and rejected == []
    plain, _ = aggregate(accepted, FederationConfig(aggregator="fedavg"), 2)
    assert plain["w"][0, 0].item() == pytest.approx((sum(honest) + 2.4) / 6)  # 1.233: dragged away
    med, _ = aggregate(accepted, FederationConfig(aggregator="fedavg", robust="median"), 2)
    assert med["w"][0, 0].item() == pytest.approx((1.0 + 1.05) / 2)  # sorted .9 .95 1 1.05 1.1 2.4
    trim, _ = aggregate(accepted, FederationConfig(aggregator="fedavg", robust="trimmed-mean"), 2)
    assert trim["w"][0, 0].item() == pytest.approx((1.0 + 1.05) / 2)  # k = ceil(0.2 * 6) = 2 cut at each end
    # an inflated sample count buys a FedAvg client influence, never a robust one
    ups[-1].num_samples = 10_000
    plain, _ = aggregate(ups, FederationConfig(aggregator="fedavg"), 2)
    assert plain["w"][0, 0].item() > 2.39
    med2, _ = aggregate(ups, FederationConfig(aggregator="fedavg", robust="median"), 2)
    assert torch.equal(med2["w"], med["w"])


def test_clipped_average_states_hand_values():
    # global head g = (1, 1) split over two keys; changes from it: a = (3, 4) (norm 5), b = (0, 1) (norm 1),
    # c = (0, -2) (norm 2). Median change norm 2: a is shortened to (1.2, 1.6), b and c are kept.
    g = {"x": t(1.0), "y": t(1.0)}
    states = [{"x": t(4.0), "y": t(5.0)}, {"x": t(1.0), "y": t(2.0)}, {"x": t(1.0), "y": t(-1.0)}]
    # equal weights: g + ((1.2, 1.6) + (0, 1) + (0, -2)) / 3 = (1.4, 1.2)
    out = clipped_average_states(states, [1, 1, 1], g)
    assert out["x"].item() == pytest.approx(1.4) and out["y"].item() == pytest.approx(1.2)
    # weights 2:1:1: g + (2 (1.2, 1.6) + (0, 1) + (0, -2)) / 4 = (1.6, 1.55)
    out = clipped_average_states(states, [2, 1, 1], g)
    assert out["x"].item() == pytest.approx(1.6) and out["y"].item() == pytest.approx(1.55)
    # even count: median norm = mean of the two middle norms; a and c with norms 5 and 2 -> tau 3.5, a shortened
    # to (2.1, 2.8), c kept: g + ((2.1, 2.8) + (0, -2)) / 2 = (2.05, 1.4)
    out = clipped_average_states([states[0], states[2]], [1, 1], g)
    assert out["x"].item() == pytest.approx(2.05) and out["y"].item() == pytest.approx(1.4)
    # a sign-flipped client moves the model no further than the median client, whatever its length
    flipped = {"x": t(1.0 - 300.0), "y": t(1.0 - 400.0)}
    out = clipped_average_states([flipped, states[1], states[2]], [1, 1, 1], g)
    # norms 500, 1, 2 -> tau 2: flipped -> (-1.2, -1.6); g + ((-1.2, -1.6) + (0, 1) + (0, -2)) / 3 = (0.6, 0.1333)
    assert out["x"].item() == pytest.approx(0.6) and out["y"].item() == pytest.approx(1.0 - 2.6 / 3)


def test_aggregate_clip_mode_uses_fedavg_weights_and_needs_the_global_head():
    g = {"w": t(0.0, 0.0)}
    ups = [ClientUpdate(site, {"w": w}, torch.eye(2), n)
           for site, w, n in [("a", t(3.0, 4.0), 2), ("b", t(0.0, 1.0), 1), ("c", t(0.0, -2.0), 1)]]
    cfg = FederationConfig(aggregator="fedavg", robust="clip")
    head, _ = aggregate(ups, cfg, 2, reference_head=g)
    assert torch.allclose(head["w"], t(0.6, 0.55))  # (2 (1.2, 1.6) + (0, 1) + (0, -2)) / 4
    unweighted = FederationConfig(aggregator="fedavg", robust="clip", weighted=False)
    assert torch.allclose(aggregate(ups, unweighted, 2, reference_head=g)[0]["w"], t(0.4, 0.2))
    with pytest.raises(ValueError, match="reference_head"):
        aggregate(ups, cfg, 2)
    assert FussConfig.from_dict({"federation": {"robust": "clip"}}).federation.robust == "clip"


def _rotation(theta: float, scale: float = 1.0) -> torch.Tensor:
    return scale * t([math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)])


def test_centroid_outliers_hand_values():
    # 5 clients, 2 centroids in 2-D. Honest: the identity rotated by -0.2, -0.1, 0.1, 0.2 rad (norms scaled, which
    # must not matter); evil: flipped (-I). Coordinate-wise median of the normalised sets: coords (0, 0) and (1, 1)
    # sorted are -1, cos .2, cos .2, cos .1, cos .1 -> cos .2; the off-diagonal ones -sin .2, -sin .1, 0, sin .1,
    # sin .2 -> 0. So M = cos(.2) I. Distances: +-0.2: sqrt(2) sin .2 = 0.2810; +-0.1: 0.1428; evil:
    # sqrt(2) (1 + cos .2) = 2.800. Median distance = sqrt(2) sin .2; evil is 9.97 x that.
    honest = [_rotation(-0.2, 2.0), _rotation(-0.1), _rotation(0.1, 3.0), _rotation(0.2)]
    ups = [ClientUpdate(f"h{i}", {}, x, 1) for i, x in enumerate(honest)] + [ClientUpdate("evil", {}, -torch.eye(2), 1)]
    median = math.sqrt(2) * math.sin(0.2)
    evil = math.sqrt(2) * (1 + math.cos(0.2))
    out = centroid_outliers(ups, 3.0)
    assert [site for site, _ in out] == ["evil"]
    assert "'evil'" in out[0][1] and f"{evil:.4g}" in out[0][1] and f"{median:.4g}" in out[0][1]
    assert evil / median == pytest.approx(9.97, abs=0.01)
    assert centroid_outliers(ups, 10.0) == []  # 9.97 x the median is not more than 10 x
    assert centroid_outliers(ups[3:], 3.0) == []  # 2 clients: no majority, no test
    for perm in itertools.permutations(ups):  # arrival order does not matter
        assert centroid_outliers(list(perm), 3.0) == out


def test_screening_rejects_outlier_centroids_when_sites_share_the_global_centroids():
    """Flipped centroids among 5 updates: rejected by default (switch C on: every site started the round from the
    global centroids, so honest sets are comparable) and in a robust mode; kept with switch C off and no robust
    mode, where sites keep their own centroids and a median over them means nothing."""
    g = torch.Generator().manual_seed(0)
    base = normalize_rows(torch.randn(3, 4, generator=g))
    ups = [ClientUpdate(f"h{i}", {"w": torch.full((2,), 1.0 + 0.01 * i)}, base + 0.05 * torch.randn(3, 4, generator=g),
                        5) for i in range(4)]
    ups.append(ClientUpdate("evil", {"w": torch.full((2,), 1.0)}, -base, 5))
    ref = {"w": torch.ones(2)}
    for federation in (None, FederationConfig(robust="median"),
                       FederationConfig(robust="median", aggregate_centroids=False)):
        accepted, rejected = screen_updates(ups, ref, 3, 4, federation=federation)
        assert [u.site for u in accepted] == ["h0", "h1", "h2", "h3"]
        assert [s for s, _ in rejected] == ["evil"] and "centroids lie" in rejected[0][1]
    accepted, rejected = screen_updates(ups, ref, 3, 4, federation=FederationConfig(aggregate_centroids=False))
    assert len(accepted) == 5 and rejected == []


# ------------------------------------------------------------------------------------------------ screening

CLUSTERS, DIM = 3, 5
_g = torch.Generator().manual_seed(0)
REF = {"w": torch.randn(4, 6, generator=_g), "b": torch.randn(4, generator=_g)}  # the current global head
DECLARED = {"h1": 5, "h2": 6, "evil": 100, "evil2": 100}


def _honest(site: str, seed: int, n: int) -> ClientUpdate:
    """A well-behaved update: the global head moved by ~5 % of its norm, unit centroids."""
    g = torch.Generator().manual_seed(seed)
    head = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in REF.items()}
    return ClientUpdate(site, head, normalize_rows(torch.randn(CLUSTERS, DIM, generator=g)), n)


def _evil(site="evil", **changes) -> ClientUpdate:
    u = _honest(site, 9, 50)
    for key, value in changes.items():
        setattr(u, key, value)
    return u


def _with_head(**tensors):
    def build(u):
        for key, value in tensors.items():
            if value is None:
                del u.head[key]
            else:
                u.head[key] = value(u.head) if callable(value) else value
        return u
    return build


class _Exploding:
    """An update object whose sample count raises when read."""

    site = "evil"
    head = REF
    centroids = torch.eye(CLUSTERS, DIM)

    @property
    def num_samples(self):
        raise RuntimeError("boom")


def _flipped():
    return [_with_head(w=lambda h: -h["w"], b=lambda h: -h["b"])(_evil())]


FLIPPED = r"head moved [12]\.\d+ x the global head's norm from it, more than 1\.5 \(federation\.max_relative_change=1\.5\)"

# name -> (hostile updates, number of honest clients beside them, what the reason must say)
HOSTILE = {
    "int64_head": (lambda: [_with_head(w=lambda h: h["w"].round().to(torch.int64))(_evil())], 2,
                   r"head\['w'\] has dtype torch.int64"),
    "bool_head": (lambda: [_with_head(b=torch.ones(4, dtype=torch.bool))(_evil())], 2,
                  r"head\['b'\] has dtype torch.bool"),
    "complex_head": (lambda: [_with_head(b=lambda h: h["b"].to(torch.complex64))(_evil())], 2,
                     r"head\['b'\] has dtype torch.complex64"),
    "bool_centroids": (lambda: [_evil(centroids=torch.ones(CLUSTERS, DIM, dtype=torch.bool))], 2,
                       r"centroids have dtype torch.bool"),
    "sparse_head": (lambda: [_with_head(w=lambda h: h["w"].to_sparse())(_evil())], 2, r"expected a dense one"),
    "count_10**400": (lambda: [_evil(num_samples=10**400)], 2, r"exceeds federation.max_samples=10000000"),
    "count_1e308_twice": (lambda: [_evil(num_samples=1e308), _evil("evil2", num_samples=1e308)], 2,
                          r"must be an integer, got float 1e\+308"),
    "count_2**63-1": (lambda: [_evil(num_samples=2**63 - 1)], 2, r"exceeds federation.max_samples"),
    "count_int_1e9_declared_100": (lambda: [_evil(num_samples=10**9)], 2, r"num_samples 1000000000 exceeds"),
    "count_float_1e9": (lambda: [_evil(num_samples=1e9)], 2, r"must be an integer, got float"),
    "count_above_declared": (lambda: [_evil(num_samples=101)], 2, r"num_samples 101 exceeds the 100 it declared"),
    "count_negative": (lambda: [_evil(num_samples=-3)], 2, r"num_samples must be > 0, got -3"),
    "count_zero": (lambda: [_evil(num_samples=0)], 2, r"num_samples must be > 0, got 0"),
    "count_float": (lambda: [_evil(num_samples=3.5)], 2, r"must be an integer, got float 3.5"),
    "count_bool": (lambda: [_evil(num_samples=True)], 2, r"must be an integer, got bool True"),
    "count_str": (lambda: [_evil(num_samples="10")], 2, r"must be an integer, got str '10'"),
    "count_none": (lambda: [_evil(num_samples=None)], 2, r"num_samples is missing"),
    "undeclared_site": (lambda: [_evil("stranger", num_samples=5)], 2, r"did not declare a sample count"),
    "zero_centroids": (lambda: [_evil(centroids=torch.zeros(CLUSTERS, DIM))], 2, r"centroids are all zero"),
    "zero_centroid_row": (lambda: [_evil(centroids=torch.eye(CLUSTERS, DIM) * torch.tensor([[1.0], [1.0], [0.0]]))],
                          2, r"1 centroid row\(s\) are zero"),
    "centroids_3e38": (lambda: [_evil(centroids=torch.full((CLUSTERS, DIM), 3e38))], 2,
                       r"norm 6\.708e\+38, more than federation.max_centroid_norm=1000"),
    "centroids_shape": (lambda: [_evil(centroids=torch.eye(CLUSTERS + 1, DIM))], 2,
                        r"centroids have shape \(4, 5\), expected \(3, 5\)"),
    "centroids_inf": (lambda: [_evil(centroids=torch.full((CLUSTERS, DIM), math.inf))], 2,
                      r"centroids contain NaN or Inf"),
    "nan_head": (lambda: [_with_head(w=lambda h: h["w"].index_fill(0, torch.tensor([1]), math.nan))(_evil())], 2,
                 r"head\['w'\] contains NaN or Inf"),
    "sign_flipped_head_2_clients": (_flipped, 1, FLIPPED),
    "sign_flipped_head_3_clients": (_flipped, 2, FLIPPED),
    "scaled_head_x100": (lambda: [_with_head(w=lambda h: 100 * h["w"], b=lambda h: 100 * h["b"])(_evil())], 2,
                         r"head moved 1?\d\d\.\d+ x the global head's norm"),
    "extra_key": (lambda: [_with_head(extra=torch.zeros(1))(_evil())], 2, r"unexpected \['extra'\]"),
    "missing_key": (lambda: [_with_head(b=None)(_evil())], 2, r"missing \['b'\]"),
    "wrong_shape": (lambda: [_with_head(w=torch.zeros(6, 4))(_evil())], 2,
                    r"head\['w'\] has shape \(6, 4\), expected \(4, 6\)"),
    "head_not_a_dict": (lambda: [_evil(head=[1, 2])], 2, r"head must be a dict of tensors, got list"),
    "duplicate_site": (lambda: [_honest("h1", 7, 5)], 2, r"duplicated site name"),
    "exploding_object": (lambda: [_Exploding()], 2, r"could not be screened \(RuntimeError: boom\)"),
}

_CONFIGS = [FederationConfig(aggregator="fedavg"), FederationConfig(aggregator="fedcc-kmeans", kmeans_n_init=2),
            FederationConfig(aggregator="fedcc-maximin", robust="median")]


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_every_hostile_update_is_rejected_naming_its_site_and_the_round_goes_on(kind):
    build, num_honest, reason = HOSTILE[kind]
    honest = [_honest("h1", 1, 5), _honest("h2", 2, 6)][:num_honest]
    hostile = build()
    for cfg in _CONFIGS:
        accepted, rejected = screen_updates(honest + hostile, REF, CLUSTERS, DIM, federation=cfg,
                                            declared_counts=DECLARED)
        assert accepted == honest, (kind, rejected)
        assert sorted(site for site, _ in rejected) == sorted(u.site for u in hostile)
        for site, why in rejected:
            assert f"site {site!r}" in why and re.search(reason, why), why
        head, centroids = aggregate(accepted, cfg, CLUSTERS)
        honest_head, honest_centroids = aggregate(honest, cfg, CLUSTERS)
        assert _equal_states(head, honest_head) and torch.equal(centroids, honest_centroids)
        assert all(torch.isfinite(v).all() for v in head.values()) and torch.isfinite(centroids).all()


def test_all_hostile_updates_in_one_round_leave_only_the_honest_ones():
    honest = [_honest("h1", 1, 5), _honest("h2", 2, 6)]
    hostile = [u for kind in sorted(HOSTILE) if kind != "duplicate_site" for u in HOSTILE[kind][0]()]
    for i, u in enumerate(hostile):  # one declared name each (the undeclared stranger keeps its name)
        if u.site != "stranger":
            u.site = f"evil{i}"
    declared = dict(DECLARED, **{f"evil{i}": 100 for i in range(len(hostile))})
    accepted, rejected = screen_updates(honest + hostile, REF, CLUSTERS, DIM, declared_counts=declared,
                                        reject_all_duplicates=True)
    assert accepted == honest and len(rejected) == len(hostile)


def test_declared_counts_are_optional_and_themselves_checked():
    over = _evil(num_samples=101)
    accepted, rejected = screen_updates([_honest("h1", 1, 5), over], REF, CLUSTERS, DIM)
    assert len(accepted) == 2 and rejected == []  # nothing declared: only federation.max_samples bounds counts
    accepted, rejected = screen_updates([_honest("h1", 1, 5), over], REF, CLUSTERS, DIM,
                                        declared_counts={"h1": 5, "evil": "lots"})
    assert [u.site for u in accepted] == ["h1"] and "did not declare a usable sample count" in rejected[0][1]
    # a configured maximum applies with or without declarations
    accepted, rejected = screen_updates([_honest("h1", 1, 5), over], REF, CLUSTERS, DIM,
                                        federation=FederationConfig(max_samples=100))
    assert "exceeds federation.max_samples=100" in rejected[0][1]


def test_relative_change_limit_is_configurable_and_works_alone():
    flipped = _flipped()[0]
    # a single client: nothing to compare with but the global head
    accepted, rejected = screen_updates([flipped], REF, CLUSTERS, DIM)
    assert accepted == [] and "max_relative_change" in rejected[0][1]
    loose = FederationConfig(max_relative_change=2.5)
    accepted, rejected = screen_updates([flipped], REF, CLUSTERS, DIM, federation=loose)
    assert accepted == [] and "head points away from the global head (cosine -" in rejected[0][1]
    moved = _with_head(w=lambda h: 2.0 * h["w"], b=lambda h: 2.0 * h["b"])(_evil())  # 1 x its norm, same direction
    assert screen_updates([moved], REF, CLUSTERS, DIM, federation=loose)[0] == [moved]
    # an all-zero reference has no scale: the relative test is skipped, the other tests still run
    zero = {k: torch.zeros_like(v) for k, v in REF.items()}
    accepted, rejected = screen_updates([flipped, _evil("evil2", num_samples=-1)], zero, CLUSTERS, DIM)
    assert accepted == [flipped] and [s for s, _ in rejected] == ["evil2"]


def _drifted(site: str, relative: float, seed: int) -> ClientUpdate:
    """The global head plus a drift of ``relative`` x its norm, orthogonal to it (how an honest long round moves:
    docs/reliability.md, long rounds)."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.cat([v.flatten() for v in REF.values()])
    noise = torch.randn(ref.shape, generator=g)
    noise -= (noise @ ref) / (ref @ ref) * ref
    flat = ref + relative * ref.norm() * noise / noise.norm()
    head, start = {}, 0
    for key, value in REF.items():
        head[key] = flat[start:start + value.numel()].view_as(value)
        start += value.numel()
    return ClientUpdate(site, head, normalize_rows(torch.randn(CLUSTERS, DIM, generator=g)), 5)


def test_long_honest_rounds_are_accepted_and_hostile_heads_of_long_rounds_are_not():
    """The bound grows with sqrt(steps) past federation.relative_change_steps: an honest 5,000-step drift (1.9 x
    the norm, as measured: 0.027 sqrt(steps)) passes; the same site's flipped or 100x head does not, at any
    number of steps; a short round keeps the 1.5 bound."""
    fed = FederationConfig()
    assert change_bound(fed, 1000) == 1.5 and change_bound(fed, None) == 1.5
    assert change_bound(fed, 5000) == pytest.approx(1.5 * math.sqrt(5))
    long_round = _drifted("big", 0.027 * math.sqrt(5000), 3)
    steps = {"big": 5000, "h1": 50}
    accepted, rejected = screen_updates([long_round, _honest("h1", 1, 5)], REF, CLUSTERS, DIM, round_steps=steps)
    assert [u.site for u in accepted] == ["big", "h1"] and rejected == []
    accepted, rejected = screen_updates([long_round], REF, CLUSTERS, DIM, round_steps={"big": 500})
    assert accepted == [] and "more than 1.5 (" in rejected[0][1]  # a short round may not drift that far
    flipped = ClientUpdate("big", {k: -v for k, v in long_round.head.items()}, long_round.centroids, 5)
    scaled = ClientUpdate("big", {k: 100 * v for k, v in long_round.head.items()}, long_round.centroids, 5)
    for hostile, why in ((flipped, "points away from the global head"),
                         (scaled, "for a round of 100000 local steps")):
        accepted, rejected = screen_updates([hostile], REF, CLUSTERS, DIM, round_steps={"big": 100_000})
        assert accepted == [] and why in rejected[0][1], rejected


def test_round_steps_are_capped_so_a_declared_count_cannot_buy_a_looser_bound():
    """A site declaring 10^7 images (max_samples) trains, and is screened as, a round of max_local_steps
    (5,000) steps: the bound stops at 1.5 x sqrt(5), so a 10x scaled head stays rejected."""
    from fuss_components.config import ConfigError, FussConfig

    cfg = FussConfig()
    assert cfg.round_steps(300) == 188 and cfg.round_steps(100_000) == 5000 and cfg.round_steps(10**7) == 5000
    assert cfg.with_overrides({"federation.max_local_steps": None}).round_steps(100_000) == 62_500
    assert change_bound(cfg.federation, cfg.round_steps(10**7)) == pytest.approx(1.5 * math.sqrt(5))
    honest = _drifted("big", 0.027 * math.sqrt(5000), 3)
    scaled = ClientUpdate("big", {k: 10 * v for k, v in honest.head.items()}, honest.centroids, 5)
    _, rejected = screen_updates([scaled], REF, CLUSTERS, DIM, round_steps={"big": cfg.round_steps(10**7)})
    assert "for a round of 5000 local steps" in rejected[0][1], rejected
    with pytest.raises(ConfigError, match="federation.max_local_steps must be >= 1"):
        cfg.with_overrides({"federation.max_local_steps": 0})


def test_median_distance_test_needs_three_clients():
    # five honest heads ~0.05 x the reference's norm away from it, one 1.2 x: under max_relative_change, but
    # ~24 x the median distance
    honest = [_honest(f"h{i}", i, 5) for i in range(5)]
    far = _evil("far", head={k: 2.2 * v for k, v in REF.items()})  # relative change exactly 1.2
    accepted, rejected = screen_updates(honest + [far], REF, CLUSTERS, DIM)
    assert len(accepted) == 6 and rejected == []  # the default 1e3 x median is far away
    accepted, rejected = screen_updates(honest + [far], REF, CLUSTERS, DIM, norm_ratio_limit=5.0)
    assert accepted == honest and rejected[0][0] == "far" and "x the median" in rejected[0][1]
    accepted, rejected = screen_updates(honest[:1] + [far], REF, CLUSTERS, DIM, norm_ratio_limit=5.0)
    assert len(accepted) == 2  # two clients: no majority, no median test


@pytest.mark.parametrize("key, value", [
    ("max_samples", 0), ("max_samples", 2**53 + 1), ("max_samples", 1.5), ("max_samples", True),
    ("max_centroid_norm", 0), ("max_centroid_norm", -1.0), ("max_centroid_norm", math.nan),
    ("max_relative_change", 0.0), ("max_relative_change", "2"),
])
def test_screening_keys_are_validated_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"federation\.{key}"):
        FussConfig.from_dict({"federation": {key: value}})
    FussConfig.from_dict({"federation": {"max_samples": 2**53, "max_centroid_norm": 1e6, "max_relative_change": 4}})


def test_honest_updates_of_the_tiny_federation_pass_the_default_screening(tiny_data_root, tmp_path):
    """A few rounds of the in-process federation (the runner's calls): no honest update is rejected, and the
    largest honest relative change stays far below federation.max_relative_change (measured <= 0.1)."""
    from conftest import tiny_config

    from fuss_components.head import join_state, split_state
    from fuss_components.site import Site, init_global_state, resolve_partition

    cfg = tiny_config(tiny_data_root, tmp_path / "cache", **{"federation.rounds": 3, "federation.local_steps": 10})
    fed, partition = cfg.federation, resolve_partition(cfg)
    sites = [Site(cfg, name, partition) for name in sorted(partition.clients)]
    declared = {s.name: s.num_samples for s in sites}
    state, largest = init_global_state(cfg), 0.0
    for round_idx in range(fed.rounds):
        reference, centroids = split_state(state)
        updates = [ClientUpdate(s.name, *split_state(r.state), r.num_samples)
                   for s, r in ((s, s.train(state, round_idx)) for s in sites)]
        accepted, rejected = screen_updates(updates, reference, *centroids.shape, federation=fed,
                                            declared_counts=declared, reject_all_duplicates=True)
        assert rejected == [] and len(accepted) == len(sites), rejected
        ref_norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in reference.values()))
        for u in updates:
            change = math.sqrt(sum(float(((u.head[k] - reference[k]).double() ** 2).sum()) for k in reference))
            largest = max(largest, change / ref_norm)
        state = join_state(*aggregate(accepted, fed, centroids.shape[0]))
    assert 0 < largest < fed.max_relative_change / 5


# ------------------------------------------------------------------------------------------------ drift


def test_matched_cosines_undo_a_permutation_of_centroid_ids():
    a = t([1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0])
    b = a[[2, 0, 1]] * 3.0  # same directions, other ids and norms
    assert agg.matched_cosines(a, b).tolist() == pytest.approx([1.0, 1.0, 1.0])
    c = t([1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    # row 0 of c is 45 degrees off the only free direction left to it
    assert sorted(agg.matched_cosines(a, c).tolist()) == pytest.approx([math.sqrt(0.5), 1.0, 1.0])


def test_centroid_drift_tells_permuted_ids_from_drifted_clusters():
    basis = torch.eye(3)
    head = {"w": t(1.0)}
    same = [_update("a", head, basis, 1), _update("b", head, basis.clone(), 1)]
    drift = agg.centroid_drift(same, FederationConfig(aggregator="fedavg"), 3)
    assert drift == pytest.approx({"site_indexwise_mean": 1.0, "site_matched_mean": 1.0, "site_matched_min": 1.0,
                                   "fedavg_fedcc_mean": 1.0, "fedavg_fedcc_min": 1.0})
    # site b holds the same clusters under cyclically shifted ids: index-wise nothing matches, matched everything
    # does; FedAvg averages e_i with e_(i+1) (cosine 1/sqrt 2 to either), FedCC recovers the basis
    permuted = [_update("a", head, basis, 1), _update("b", head, basis[[1, 2, 0]], 1)]
    for aggregator in ("fedcc-kmeans", "fedcc-maximin"):
        drift = agg.centroid_drift(permuted, FederationConfig(aggregator=aggregator), 3)
        assert drift["site_indexwise_mean"] == pytest.approx(0.0, abs=1e-12)
        assert drift["site_matched_mean"] == pytest.approx(1.0) and drift["site_matched_min"] == pytest.approx(1.0)
        assert drift["fedavg_fedcc_mean"] == pytest.approx(math.sqrt(0.5))
        assert drift["fedavg_fedcc_min"] == pytest.approx(math.sqrt(0.5))
    alone = agg.centroid_drift([_update("a", head, basis, 1)], FederationConfig(), 3)
    assert set(alone) == {"fedavg_fedcc_mean", "fedavg_fedcc_min"}  # no pair of sites to compare
