"""Reliability (issue 6), without the FLARE simulator: resume, determinism, hostile updates and robust aggregation,
data faults at a site, configuration validation. Simulator-based checks are in test_flare_reliability.py;
docs/reliability.md lists which test proves which point.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fuss_components.cache as cache_mod
from fuss_components.aggregation import ClientUpdate, aggregate, normalize_rows, robust_average_states
from fuss_components.cache import CacheError, FeatureCache
from fuss_components.config import ConfigError, FussConfig
from fuss_components.datasets import DataError, open_dataset
from fuss_components.head import split_state
from fuss_components.runner import load_model, run_federated
from fuss_components.site import Site, init_global_state, resolve_partition

from conftest import make_tiny_dataset, tiny_config


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64).float()


def _site(cfg, name="s1"):
    return Site(cfg, name, resolve_partition(cfg))


def _equal_states(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ============================================================================== 1. resume


def _rounds(site: Site, cfg: FussConfig, upto: int):
    """Rounds 0..upto-1 of a one-site federation (the global model is the site's own result): the states
    received before each round."""
    state = init_global_state(cfg)
    received = []
    for r in range(upto):
        received.append(state)
        state = site.train(state, r).state
    return received, state


@pytest.mark.parametrize("overrides", [
    {"train.moon_weight": 1.0},
    {"federation.average_head": False},
    {"federation.aggregate_centroids": False},
    {},  # nothing carries over: exact without any saved state
], ids=["moon", "E-off", "C-off", "default"])
def test_site_restarted_after_round_k_continues_exactly(tiny_cfg, overrides):
    """A site process that dies after round 1 and is restarted for round 2 gives the same round-2 update as one
    that never stopped: previous local model from the site's disk, shifts and random draws recomputed."""
    cfg = tiny_cfg.with_overrides(overrides) if overrides else tiny_cfg
    continuous = _site(cfg)
    received, _ = _rounds(continuous, cfg, 3)
    # what the server sends for round 3 (anything works: the same for both)
    global3 = {k: v + 0.01 for k, v in received[2].items()}
    reference = continuous.train(global3, 3)

    restarted = _site(cfg)  # a fresh process: nothing in memory
    assert restarted._trainer is None
    again = restarted.train(global3, 3)
    assert _equal_states(again.state, reference.state)
    assert again.metrics["loss_self"] == reference.metrics["loss_self"]
    if overrides:
        assert restarted.keeps_local_state
        files = sorted(p.name for p in restarted.state_dir().iterdir())
        assert files == ["round_0002.pt", "round_0003.pt"]  # only the last two rounds are kept
    else:
        assert not restarted.keeps_local_state and not (Path(cfg.cache_dir) / "site_state").exists()


def test_resume_without_saved_local_state_is_not_exact_and_says_so(tiny_cfg, caplog):
    """Control for the test above (it can fail): without the saved state, MOON's round differs, with a warning."""
    cfg = tiny_cfg.with_overrides({"train.moon_weight": 1.0})
    continuous = _site(cfg)
    received, _ = _rounds(continuous, cfg, 2)
    reference = continuous.train(received[1], 2)
    for path in continuous.state_dir().iterdir():
        path.unlink()
    with caplog.at_level(logging.WARNING):
        again = _site(cfg).train(received[1], 2)
    assert not _equal_states(again.state, reference.state)
    assert "no local state of round 1" in caplog.text and "not exact" in caplog.text


def test_saved_local_state_is_keyed_by_configuration_and_site(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"train.moon_weight": 1.0})
    a, b = _site(cfg, "s1"), _site(cfg, "s2")
    assert a.state_dir() != b.state_dir()
    assert _site(cfg.with_overrides({"federation.rounds": 7}), "s1").state_dir() == a.state_dir()  # resume: R grows
    assert _site(cfg.with_overrides({"train.lr_head": 1e-3}), "s1").state_dir() != a.state_dir()
    assert _site(cfg.with_overrides({"federation.seed": 5}), "s1").state_dir() != a.state_dir()


def test_local_state_write_failure_names_the_path(tiny_data_root, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data_root, tmp_path / "cache", **{"train.moon_weight": 1.0})
    site = _site(cfg)
    site.trainer  # features built while the disk is fine
    real_replace = os.replace

    def full(src, dst):
        if "site_state" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(CacheError, match="round_0000.pt") as err:
        site.train(init_global_state(cfg), 0)
    assert str(site.state_dir()) in str(err.value)
    assert not list(site.state_dir().iterdir())  # no temporary file left behind


# ============================================================================== 2. determinism


def test_two_runs_with_the_same_seeds_give_identical_models(tiny_data_root, tmp_path):
    """Two complete in-process federations (separate feature caches, so extraction is repeated too)."""
    models, metrics = [], []
    for i in range(2):
        cfg = tiny_config(tiny_data_root, tmp_path / f"cache{i}", **{"federation.rounds": 3})
        result = run_federated(cfg, tmp_path / f"run{i}", progress=False)
        models.append(load_model(tmp_path / f"run{i}" / "model.pt")[0])
        metrics.append([r["miou"] for r in result["rounds"]])
    assert _equal_states(models[0], models[1])
    assert metrics[0] == metrics[1]
    # control: another federation seed gives another model (so the comparison above can fail)
    cfg = tiny_config(tiny_data_root, tmp_path / "cache0", **{"federation.rounds": 3, "federation.seed": 1,
                                                                "train.seed": 1})
    run_federated(cfg, tmp_path / "other", progress=False)
    assert not _equal_states(models[0], load_model(tmp_path / "other" / "model.pt")[0])


def test_flare_aggregator_result_does_not_depend_on_arrival_order(tmp_path):
    from test_flare_components import aggregated, make_aggregator, near_global, train_result

    outs = []
    order = [("site-1", 1, 4), ("site-2", 2, 7), ("site-3", 3, 5)]
    for perm in itertools.permutations(order):
        _, agg, fl_ctx = make_aggregator(tmp_path, "fedcc-kmeans", declared_counts={c: n for c, _, n in order})
        for client, seed, n in perm:
            assert agg.accept(train_result(client, near_global(seed), n), fl_ctx)
        outs.append(aggregated(agg, fl_ctx))
    assert all(_equal_states(o, outs[0]) for o in outs[1:])
    # control: other sample counts give another model (so the comparison above can fail)
    _, agg, fl_ctx = make_aggregator(tmp_path, "fedcc-kmeans", min_clients=3)
    for client, seed, n in order:
        assert agg.accept(train_result(client, near_global(seed), 1 if client == "site-2" else n), fl_ctx)
    assert not _equal_states(aggregated(agg, fl_ctx), outs[0])


# ============================================================================== 3. hostile updates, robust mode


def _hostile_batch():
    """Three good updates and one of every hostile kind the issue lists, as (FLARE client, state, num_samples,
    declared site); every client is its own authenticated FLARE identity."""
    from test_flare_components import GLOBAL_SEED, model_state, near_global

    good = [("g1", near_global(1), 5, None), ("g2", near_global(2), 6, None), ("g3", near_global(3), 7, None)]
    ref = model_state(GLOBAL_SEED)
    huge = {k: ref[k] + 1e6 * (v - ref[k]) if k.startswith("head.") else v for k, v in near_global(4).items()}
    bad = [
        ("shape", dict(near_global(5), **{"head.linear.weight": torch.zeros(2, 2)}), 5, None),
        ("clusters", dict(near_global(6), centroids=torch.randn(4, 4)), 5, None),
        ("nan", dict(near_global(7), **{"head.linear.bias": torch.full((4,), math.nan)}), 5, None),
        ("inf", dict(near_global(8), centroids=torch.full((3, 4), math.inf)), 5, None),
        ("norm", huge, 5, None),
        ("missing_n", near_global(9), None, None),
        ("negative_n", near_global(10), -4, None),
        ("overclaim", near_global(11), 50, None),  # more images than it declared in the census
        ("impostor", near_global(12), 5, "g1"),  # declares another site's name
        ("g2", near_global(13), 6, None),  # a second result of g2 in the round
    ]
    return good, bad


EXPECTED_REASON = {
    "shape": "head['linear.weight'] has shape (2, 2)",
    "clusters": "centroids have shape (4, 4), expected (3, 4)",
    "nan": "contains NaN",
    "inf": "centroids contain NaN or Inf",
    "norm": "federation.max_relative_change",
    "missing_n": "num_samples is missing",
    "negative_n": "num_samples must be > 0",
    "overclaim": "num_samples 50 exceeds the 5 it declared when the job started",
    "impostor": "declares site 'g1' but FLARE authenticated it as 'impostor'",
    "g2": "sent a second result in this round",
}


@pytest.mark.parametrize("min_clients, proceeds", [(3, True), (4, False)])
def test_flare_aggregator_rejects_every_hostile_update_naming_the_site(tmp_path, caplog, min_clients, proceeds):
    """All hostile kinds in one round: each is rejected with a logged reason naming its FLARE client. g2's first
    result counts, so 3 good updates remain: the round proceeds with min_clients=3 and fails with a clear message
    with min_clients=4."""
    from fuss_components.aggregation import AggregationError
    from test_flare_components import aggregated, make_aggregator, screening_report, train_result

    good, bad = _hostile_batch()
    declared = {client: 5 for client, *_ in bad} | {client: n for client, _, n, _ in good}
    _, agg, fl_ctx = make_aggregator(tmp_path, "fedcc-kmeans", min_clients=min_clients, declared_counts=declared)
    with caplog.at_level(logging.WARNING):
        for client, state, n, site in good + bad:
            agg.accept(train_result(client, state, n, site=site), fl_ctx)
        if proceeds:
            out = aggregated(agg, fl_ctx)
        else:
            with pytest.raises(AggregationError) as err:
                agg.aggregate(fl_ctx)
    report = screening_report(fl_ctx)
    reasons = dict(report["rejected"])
    assert report["accepted"] == ["g1", "g2", "g3"]
    assert len(report["rejected"]) == len(bad) and set(reasons) == set(EXPECTED_REASON)
    for client, expected in EXPECTED_REASON.items():
        assert expected in reasons[client], (client, reasons[client])
        assert f"round 4: rejected the update of {client}: " in caplog.text
    if proceeds:
        head, centroids = split_state(out)
        assert torch.isfinite(centroids).all() and centroids.shape == (3, 4)
    else:
        assert "3 acceptable update(s) ['g1', 'g2', 'g3'], fewer than min_clients=4" in str(err.value)


def test_flare_aggregator_applies_the_robust_mode_of_the_job(tmp_path, caplog):
    """The job's federation.robust reaches the FLARE aggregator: flipped centroids rejected (logged, naming the
    site), the head is the coordinate-wise median of the rest."""
    from test_flare_components import aggregated, make_aggregator, near_global, screening_report, train_result

    cfg, agg, fl_ctx = make_aggregator(tmp_path, "fedavg", min_clients=1, robust="median")
    g = torch.Generator().manual_seed(0)
    base = normalize_rows(torch.randn(3, 4, generator=g))
    honest = [dict(near_global(i), centroids=base + 0.05 * torch.randn(3, 4, generator=g)) for i in range(4)]
    evil = dict(near_global(9), centroids=-base)
    with caplog.at_level(logging.WARNING):
        for i, state in enumerate(honest + [evil]):
            agg.accept(train_result(f"s{i}" if i < 4 else "evil", state, 5 + i), fl_ctx)
        out = aggregated(agg, fl_ctx)
    report = screening_report(fl_ctx)
    assert report["accepted"] == ["s0", "s1", "s2", "s3"]
    assert [s for s, _ in report["rejected"]] == ["evil"]
    assert "rejected the update of evil" in caplog.text and "centroids lie" in caplog.text
    updates = [ClientUpdate(f"s{i}", *split_state(st), 5 + i) for i, st in enumerate(honest)]
    head, centroids = aggregate(updates, cfg.federation, 3)
    assert all(torch.equal(out["head." + k], v) for k, v in head.items()) and torch.equal(out["centroids"], centroids)
    median = robust_average_states([u.head for u in updates], "median")
    assert torch.equal(head["linear.weight"], median["linear.weight"])


# ============================================================================== 4. data faults


@pytest.fixture
def ds(tiny_data_root):
    return open_dataset("tiny", tiny_data_root)


def _npy(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".npy"))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp"))


def test_every_cache_file_has_a_checksum_sidecar(tiny_cfg, ds):
    cache = FeatureCache(tiny_cfg, "tiny")
    ids = ds.ids(site="s1")[:3]
    cache.ensure(ds, ids, ["train"], progress=False)
    for i in ids:
        path = cache.path("train", i)
        side = json.loads(cache.checksum_path(path).read_text())
        import hashlib

        assert side == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}


def test_corrupted_cache_file_of_the_right_size_is_detected_and_rebuilt(tiny_cfg, ds, caplog):
    """A flipped byte in the data (same size, valid header: np.load would accept it) is caught by the sha256."""
    cache = FeatureCache(tiny_cfg, "tiny")
    ids = ds.ids(site="s1")[:3]
    cache.ensure(ds, ids, ["train"], progress=False)
    path = cache.path("train", ids[1])
    good = path.read_bytes()
    blob = bytearray(good)
    blob[-7] ^= 0xFF
    path.write_bytes(bytes(blob))
    np.load(path)  # still a well-formed .npy: the old structural check alone would have trusted it
    with caplog.at_level(logging.WARNING):
        assert cache.missing("train", ids) == [ids[1]]
    assert str(path) in caplog.text and "sha256" in caplog.text
    with pytest.raises(CacheError, match="sha256"):
        cache.load_train(ids, knn=2)
    assert cache.ensure(ds, ids, ["train"], progress=False) == {"train": 1}
    assert path.read_bytes() == good
    assert cache.load_train(ids, knn=2).num_images == 3


@pytest.mark.parametrize("damage", ["truncated", "sidecar_garbage", "sidecar_of_other_content"])
def test_other_damage_is_detected_and_rebuilt(tiny_cfg, ds, damage):
    cache = FeatureCache(tiny_cfg, "tiny")
    ids = ds.ids(site="s1")[:2]
    cache.ensure(ds, ids, ["train"], progress=False)
    path = cache.path("train", ids[0])
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) - 100])
    elif damage == "sidecar_garbage":
        cache.checksum_path(path).write_text("{not json")
    else:
        cache.checksum_path(path).write_text(cache.checksum_path(cache.path("train", ids[1])).read_text())
    assert not cache.is_valid("train", ids[0])
    with pytest.raises(CacheError, match=str(path)):
        cache.load_train(ids, knn=2)
    assert cache.ensure(ds, ids, ["train"], progress=False) == {"train": 1}
    assert path.read_bytes() == good and cache.is_valid("train", ids[0])


def test_cache_file_without_sidecar_is_rebuilt_never_adopted(tiny_cfg, ds):
    """No sidecar (deleted, or a cache from before sidecars): intact or not, the file is re-extracted, never
    adopted, so a deleted sidecar cannot launder corrupted bytes (test_cache.py has the corrupted case)."""
    cache = FeatureCache(tiny_cfg, "tiny")
    ids = ds.ids(site="s1")[:2]
    cache.ensure(ds, ids, ["train"], progress=False)
    good = [cache.path("train", i).read_bytes() for i in ids]
    for i in ids:
        cache.checksum_path(cache.path("train", i)).unlink()
    cache.path("train", ids[1]).write_bytes(good[1][:-50])  # and truncate one
    assert cache.missing("train", ids) == ids
    assert not any(cache.checksum_path(cache.path("train", i)).exists() for i in ids)  # nothing adopted
    with pytest.raises(CacheError, match="no checksum file"):
        cache.load_train(ids, knn=2)
    assert cache.ensure(ds, ids, ["train"], progress=False) == {"train": 2}
    assert [cache.path("train", i).read_bytes() for i in ids] == good
    assert all(cache.is_valid("train", i) for i in ids)


def _disk_full_after(monkeypatch, victim: str, half: bool):
    """Make the write of the file whose name contains `victim` fail like a full disk: half of the bytes land in
    the temporary file, then ENOSPC (half=True); or the final rename fails (half=False)."""
    real_fdopen, real_replace = os.fdopen, os.replace
    state = {"tmp": None}

    class HalfWriter:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
            return False

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.handle.flush()

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        if half and state["target"] is not None:
            return HalfWriter(handle)
        return handle

    def replace(src, dst):
        if victim in Path(dst).name and Path(dst).suffix == ".npy":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    real_atomic = cache_mod._atomic_write

    def atomic(path, data):
        state["target"] = path if (victim in path.name and path.suffix == ".npy") else None
        try:
            return real_atomic(path, data)
        finally:
            state["target"] = None

    state["target"] = None
    monkeypatch.setattr(cache_mod, "_atomic_write", atomic)
    monkeypatch.setattr(os, "fdopen", fdopen)
    if not half:
        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("half", [True, False], ids=["write", "rename"])
def test_disk_full_while_writing_fails_with_path_and_leaves_nothing_trusted(tiny_cfg, ds, monkeypatch, half):
    ids = ds.ids(site="s1")
    victim = ids[2]
    cache = FeatureCache(tiny_cfg, "tiny")
    _disk_full_after(monkeypatch, victim, half)
    with pytest.raises(CacheError) as err:
        cache.ensure(ds, ids, ["train"], progress=False, batch_images=4)
    path = cache.path("train", victim)
    assert str(path) in str(err.value) and "disk full" in str(err.value)
    folder = cache.dir("train")
    assert _leftovers(folder) == []  # no temporary file
    assert not path.exists() and not cache.checksum_path(path).exists()  # nothing half-written
    assert _npy(folder) == sorted(f"{i}.npy" for i in ids[:2])  # the ones before stay valid
    monkeypatch.undo()
    fresh = FeatureCache(tiny_cfg, "tiny")  # a later run
    assert fresh.missing("train", ids) == ids[2:]
    assert fresh.ensure(ds, ids, ["train"], progress=False) == {"train": 4}
    assert fresh.load_train(ids, knn=2).num_images == 6


def test_failed_rewrite_of_a_damaged_file_leaves_it_untrusted(tiny_cfg, ds, monkeypatch):
    """The damaged old file is removed before the rewrite: a failed rewrite cannot leave it to be adopted."""
    ids = ds.ids(site="s1")[:3]
    cache = FeatureCache(tiny_cfg, "tiny")
    cache.ensure(ds, ids, ["train"], progress=False)
    path = cache.path("train", ids[1])
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x55
    path.write_bytes(bytes(blob))
    _disk_full_after(monkeypatch, ids[1], half=False)
    with pytest.raises(CacheError, match=str(path)):
        cache.ensure(ds, ids, ["train"], progress=False)
    monkeypatch.undo()
    assert not path.exists()
    assert FeatureCache(tiny_cfg, "tiny").missing("train", ids) == [ids[1]]


def test_unwritable_cache_location_fails_with_the_path(tiny_data_root, tmp_path, ds):
    """Root ignores permission bits, so the unwritable place is a path whose parent is a regular file."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a regular file")
    cfg = tiny_config(tiny_data_root, blocker / "cache")
    cache = FeatureCache(cfg, "tiny")
    with pytest.raises(CacheError) as err:
        cache.ensure(ds, ds.ids(site="s1")[:2], ["train"], progress=False)
    assert str(blocker / "cache") in str(err.value)
    assert blocker.read_text() == "a regular file"


def test_atomic_write_wraps_every_os_error_with_the_path(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(CacheError, match=str(blocker / "x.npy")):
        cache_mod._atomic_write(blocker / "x.npy", b"data")


@pytest.fixture
def bad_image_root(tmp_path):
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 6, "s2": 5, "s3": 4})
    ds = open_dataset("tiny", root)
    bad_train, bad_val = ds.sample("s1_003").image_path, ds.sample("s3_001").image_path
    Path(bad_train).write_bytes(b"not an image")
    Path(bad_val).write_bytes(b"")
    return root, str(bad_train), str(bad_val)


def test_unreadable_image_is_fatal_by_default_naming_its_path(bad_image_root, tmp_path):
    root, bad_train, _ = bad_image_root
    cfg = tiny_config(root, tmp_path / "cache")
    assert cfg.data.on_bad_image == "fail"
    with pytest.raises(DataError) as err:
        _site(cfg).train(init_global_state(cfg), 0)
    assert bad_train in str(err.value) and "on_bad_image" in str(err.value)


def test_unreadable_images_are_skipped_and_counted_when_configured(bad_image_root, tmp_path, caplog, monkeypatch):
    root, bad_train, bad_val = bad_image_root
    cfg = tiny_config(root, tmp_path / "cache", **{"data.on_bad_image": "skip"})
    with caplog.at_level(logging.WARNING):
        site = _site(cfg, "s1")
        result = site.train(init_global_state(cfg), 0)
    assert result.metrics["skipped_images"] == 1.0 and result.num_samples == 5
    assert site.skipped_images == {"train": ["s1_003"]}
    assert bad_train in caplog.text
    assert _site(cfg, "s2").train(init_global_state(cfg), 0).metrics["skipped_images"] == 0.0
    s3 = _site(cfg, "s3")
    val = s3.validate(init_global_state(cfg))
    assert val["skipped_images"] == 1 and val["num_images"] == 3
    assert bad_val in caplog.text
    # the next validation in the same process does not retry (no backbone load for a known-bad image)
    monkeypatch.setattr(cache_mod, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded again"))
    assert s3.validate(init_global_state(cfg))["num_images"] == 3
    monkeypatch.undo()
    # a whole in-process federation completes and reports the count per round
    result = run_federated(cfg, tmp_path / "run", progress=False)
    assert [r["train"]["s1"]["skipped_images"] for r in result["rounds"]] == [1.0, 1.0]
    assert result["final"]["s3"]["num_images"] == 3


# ============================================================================== 6. configuration validation


@pytest.mark.parametrize("data, key", [
    ({"federation": {"robust": "krum"}}, "federation.robust"),
    ({"federation": {"robust": 1}}, "federation.robust"),
    ({"federation": {"trim_fraction": 0.5}}, "federation.trim_fraction"),
    ({"federation": {"trim_fraction": -0.1}}, "federation.trim_fraction"),
    ({"federation": {"trim_fraction": "a fifth"}}, "federation.trim_fraction"),
    ({"federation": {"centroid_outlier_ratio": 1.0}}, "federation.centroid_outlier_ratio"),
    ({"federation": {"robustness": "median"}}, "federation.robustness"),
    ({"data": {"on_bad_image": "ignore"}}, "data.on_bad_image"),
    ({"data": {"on_bad_image": False}}, "data.on_bad_image"),
    ({"train": {"num_clusters": 0}}, "train.num_clusters"),
    ({"train": {"lr_head": -1e-4}}, "train.lr_head"),
])
def test_new_and_issue_keys_are_validated_naming_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        FussConfig.from_dict(data)


def test_partition_dependent_checks_fail_before_any_work(tiny_data_root, tmp_path):
    cfg = tiny_config(tiny_data_root, tmp_path / "cache", **{"federation.min_clients": 3})  # 2 training sites
    with pytest.raises(ConfigError, match=r"federation\.min_clients=3 exceeds the 2 training site"):
        run_federated(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing extracted or written
    # a partition without any training site cannot federate, whatever the aggregator
    for aggregator in ("fedcc-kmeans", "fedavg"):
        with pytest.raises(ConfigError, match="no training site"):
            FussConfig.from_dict({"federation": {"aggregator": aggregator}}).check_sites(0)
    FussConfig().check_sites(1)


def test_cli_and_job_export_fail_before_work_naming_the_key(tiny_data_root, tmp_path, capsys):
    from fuss_components.cli import main as fuss
    from fuss_flare.job import main as export

    assert fuss(["train", "--mode", "federated", "--set", "federation.robust=krum",
                 "--out", str(tmp_path / "a")]) == 2
    assert "federation.robust" in capsys.readouterr().err and not (tmp_path / "a").exists()
    cfg = tiny_config(tiny_data_root, tmp_path / "cache", **{"federation.min_clients": 5})
    cfg.save(tmp_path / "c.json")
    assert fuss(["train", "--mode", "federated", "--config", str(tmp_path / "c.json"),
                 "--out", str(tmp_path / "b")]) == 2
    assert "federation.min_clients" in capsys.readouterr().err and not (tmp_path / "cache").exists()
    for bad in (["--set", "federation.trim_fraction=0.7"], ["--set", "data.on_bad_image=maybe"],
                ["--set", "federation.nope=1"], ["--set", "train.lr_head=-1"]):
        assert export(["export", "--preset", "camvid", "--out", str(tmp_path / "jobs"), *bad]) == 2
        key = bad[1].split("=")[0]
        assert key in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()


def test_flare_site_and_server_validate_the_job_config(tmp_path, monkeypatch):
    """The site (``load_site_config``) and the server components (``load_job_config``) read the job's
    ``config/fuss_config.json`` through FussConfig.load (validated); a site's own overrides are validated too."""
    from nvflare.apis.fl_constant import FLContextKey
    from nvflare.apis.fl_context import FLContext

    from fuss_flare import load_job_config, load_site_config

    (tmp_path / "config").mkdir()
    job_config = tmp_path / "config" / "fuss_config.json"
    job_config.write_text(json.dumps({"federation": {"robust": "median", "trim_fraction": 0.9}}))
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=False)
    monkeypatch.delenv("FUSS_SITE_CONFIG", raising=False)
    for load in (load_site_config, load_job_config):
        with pytest.raises(ConfigError, match=r"federation\.trim_fraction"):
            load(fl_ctx)
    job_config.write_text(json.dumps({"federation": {"robust": "median", "trim_fraction": 0.2}}))
    assert load_job_config(fl_ctx).federation.trim_fraction == 0.2  # control: a valid config loads
    overrides = tmp_path / "site.json"
    overrides.write_text(json.dumps({"federation.trim_fraction": 0.7}))
    monkeypatch.setenv("FUSS_SITE_CONFIG", str(overrides))
    with pytest.raises(ConfigError, match=r"federation\.trim_fraction"):
        load_site_config(fl_ctx)
