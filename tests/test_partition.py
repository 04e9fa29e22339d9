"""Partitions: dominant class, by-site / Dirichlet / IID splits, presets, manifest round trip and checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import test_datasets as tds  # the fixture builders (official Cityscapes / COCO-Stuff layouts, folder layout)
from fuss_components.datasets import CityscapesDataset, CocoStuff27Dataset, DataError, FolderDataset, open_dataset
from fuss_components.partition import (
    PRESETS,
    Partition,
    dominant_class,
    partition_by_site,
    partition_dirichlet,
    partition_iid,
    preset_partition,
    preset_site_names,
)

N_CLASSES = 6
PER_CLASS = 20


@pytest.fixture(scope="module")
def skew_ds(tmp_path_factory) -> FolderDataset:
    """120 tiny images, 20 per dominant class 1..6 (class 0 = background), interleaved, one site."""
    dominant = [1 + n % N_CLASSES for n in range(N_CLASSES * PER_CLASS)]
    root = tds.make_folder_dataset(tmp_path_factory.mktemp("skew"), name="skew",
                                   sites={"all": {"train": len(dominant)}},
                                   classes=tuple(["bg"] + [f"c{k}" for k in range(1, N_CLASSES + 1)]),
                                   size=(8, 8), dominant=dominant)
    return FolderDataset(root)


@pytest.fixture
def mini_ds(tmp_path) -> FolderDataset:
    return FolderDataset(tds.make_folder_dataset(
        tmp_path, sites={"s1": {"train": 3}, "s2": {"train": 2, "test": 1}, "s3": {"test": 2}}))


def _entropy(counts) -> float:
    p = np.asarray(counts, float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------- dominant class
def test_dominant_class():
    lab = np.full((4, 5), 255, np.uint8)
    lab[0, :3] = 2  # 3 pixels of class 2, 2 of class 0; ignore is the majority but never counts
    lab[1, :2] = 0
    assert dominant_class(lab) == 2
    assert dominant_class(np.full((3, 3), 255, np.uint8)) == -1
    tie = np.array([[4, 4, 1, 1]], np.uint8)
    assert dominant_class(tie) == 1  # ties: smallest id
    assert dominant_class(np.array([[7, 7, 3]], np.uint8), ignore_index=7) == 3


# ---------------------------------------------------------------------------------------------- by site
def test_partition_by_site(mini_ds):
    p = partition_by_site(mini_ds, validation_sites=["s3"])
    assert p.strategy == "site" and p.dataset == "mini" and p.num_classes == 3
    assert p.sites() == ["s1", "s2"]
    assert p.clients == {"s1": ["s1_train_000", "s1_train_001", "s1_train_002"],
                         "s2": ["s2_train_000", "s2_train_001", "s2_test_000"]}
    assert p.validation == {"s3": ["s3_test_000", "s3_test_001"]}
    p.validate(mini_ds)
    q = partition_by_site(mini_ds, ["s2"], ["s2"], splits=["train"], validation_splits=["test"])
    assert q.clients == {"s2": ["s2_train_000", "s2_train_001"]} and q.validation == {"s2": ["s2_test_000"]}
    g = partition_by_site(mini_ds, groups={"a": ["s1", "s3"]})
    assert g.clients["a"] == ["s1_train_000", "s1_train_001", "s1_train_002", "s3_test_000", "s3_test_001"]
    assert g.meta["client_sites"] == {"a": ["s1", "s3"]}
    with pytest.raises(DataError, match="'nowhere'"):
        partition_by_site(mini_ds, ["s1", "nowhere"])
    with pytest.raises(DataError, match="'s3'"):  # s3 has no train images
        partition_by_site(mini_ds, ["s3"], splits=["train"])


# ---------------------------------------------------------------------------------------------- Dirichlet
def test_dirichlet_reads_labels_and_is_deterministic(skew_ds):
    ids = skew_ds.ids()
    a = partition_dirichlet(skew_ds, ids, 4, 0.5, seed=3, progress=False)
    b = partition_dirichlet(skew_ds, ids, 4, 0.5, seed=3, progress=False)
    c = partition_dirichlet(skew_ds, ids, 4, 0.5, seed=4, progress=False)
    assert a.to_dict() == b.to_dict()
    assert a.clients != c.clients
    assert a.strategy == "dirichlet" and a.seed == 3 and a.meta["alpha"] == 0.5
    assert list(a.clients) == ["client1", "client2", "client3", "client4"]
    all_ids = [i for v in a.clients.values() for i in v]
    assert sorted(all_ids) == sorted(ids) and len(all_ids) == len(ids)
    assert all(a.clients.values())
    # the labels were read: per-client dominant-class histograms add up to 20 images of each class 1..6
    hist = np.array(list(a.meta["dominant_class_counts"].values()))
    assert hist.sum(axis=0).tolist() == [0] + [PER_CLASS] * N_CLASSES
    a.validate(skew_ds)


def test_dirichlet_small_alpha_is_skewed(skew_ds):
    ids = skew_ds.ids()
    dom = {i: 1 + n % N_CLASSES for n, i in enumerate(ids)}

    def mean_entropy(alpha: float) -> float:
        vals = []
        for seed in range(5):
            p = partition_dirichlet(skew_ds, ids, 3, alpha, seed, dominant=dom)
            vals += [_entropy(h) for h in p.meta["dominant_class_counts"].values()]
        return float(np.mean(vals))

    skewed, even = mean_entropy(0.05), mean_entropy(100.0)
    assert even > 0.95 * np.log(N_CLASSES)  # near-uniform class mix in every client
    assert skewed < 0.5 * even


def test_dirichlet_empty_client_errors(skew_ds):
    ids = skew_ds.ids()[:10]
    one_class = {i: 1 for i in ids}
    with pytest.raises(DataError, match=r"client 'client\d' empty in all 5 attempts"):
        partition_dirichlet(skew_ds, ids, 3, 1e-3, 0, dominant=one_class, max_tries=5)
    with pytest.raises(DataError, match="10 images into 11"):
        partition_dirichlet(skew_ds, ids, 11, 0.5, 0, dominant=one_class)
    with pytest.raises(DataError, match="not in dataset"):
        partition_dirichlet(skew_ds, ids + ["ghost"], 2, 0.5, 0, dominant=one_class)


# ---------------------------------------------------------------------------------------------- IID
def test_iid_equal_sizes_and_seeds(skew_ds):
    ids = skew_ds.ids()[:10]
    p = partition_iid(skew_ds, ids, 3, seed=0)
    assert [len(v) for v in p.clients.values()] == [4, 3, 3]
    assert sorted(i for v in p.clients.values() for i in v) == sorted(ids)
    assert partition_iid(skew_ds, ids, 3, seed=0).clients == p.clients
    assert partition_iid(skew_ds, ids, 3, seed=1).clients != p.clients
    q = partition_iid(skew_ds, None, 4, seed=2)
    assert [len(v) for v in q.clients.values()] == [30, 30, 30, 30] and q.strategy == "iid"


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_round_trip(tmp_path, skew_ds):
    p = partition_dirichlet(skew_ds, None, 3, 0.5, 7, validation={"val": skew_ds.ids()[:4]}, progress=False)
    path = p.save(tmp_path / "sub" / "partition.json")
    data = json.loads(path.read_text())
    assert list(data) == ["dataset", "strategy", "seed", "num_classes", "clients", "validation", "meta"]
    assert data["strategy"] == "dirichlet" and data["seed"] == 7 and data["num_classes"] == N_CLASSES + 1
    q = Partition.load(path)
    assert q == p
    assert q.sites() == ["client1", "client2", "client3"] and q.validation_sites() == ["val"]


def test_manifest_malformed_names_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        Partition.load(bad)
    good = {"dataset": "d", "strategy": "site", "seed": 0, "num_classes": 3, "clients": {"a": ["x"]},
            "validation": {}, "meta": {}}
    for broken in ({k: v for k, v in good.items() if k != "clients"}, {**good, "strategy": "random"},
                   {**good, "clients": {"a": [1, 2]}}, {**good, "seed": "0"}, [good]):
        bad.write_text(json.dumps(broken))
        with pytest.raises(DataError, match=re.escape(str(bad))):
            Partition.load(bad)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "missing.json"))):
        Partition.load(tmp_path / "missing.json")


def test_validate_unknown_id_and_empty_client(mini_ds):
    p = Partition("mini", "site", 0, 3, {"s1": ["s1_train_000", "ghost_id"]}, {})
    with pytest.raises(DataError, match="'s1'.*ghost_id"):
        p.validate(mini_ds)
    p = Partition("mini", "site", 0, 3, {"s1": ["s1_train_000"], "lonely": []}, {})
    with pytest.raises(DataError, match="client 'lonely' has no images"):
        p.validate(mini_ds)
    p = Partition("mini", "site", 0, 3, {"s1": ["s1_train_000"]}, {"v": ["nope"]})
    with pytest.raises(DataError, match="'v'.*nope"):
        p.validate(mini_ds)
    with pytest.raises(DataError, match="5 classes"):
        Partition("mini", "site", 0, 5, {"s1": ["s1_train_000"]}, {}).validate(mini_ds)


# ---------------------------------------------------------------------------------------------- presets
def test_preset_cityscapes(tmp_path):
    ds = CityscapesDataset(tds.make_cityscapes(tmp_path))
    p = preset_partition("cityscapes", ds)
    assert p.strategy == "site" and p.num_classes == 27
    assert p.clients == {"client1": ["aachen_000000_000019", "aachen_000001_000019"],
                         "client2": ["bochum_000000_000019", "bochum_000001_000019"],
                         "client3": ["bremen_000000_000019", "bremen_000001_000019"]}
    assert p.meta["client_sites"] == {"client1": ["aachen"], "client2": ["bochum"], "client3": ["bremen"]}
    assert p.validation == {"val": ["frankfurt_000000_000019", "frankfurt_000001_000019"]}
    p.validate(ds)
    one = preset_partition("cityscapes", ds, num_clients=1)
    assert one.meta["client_sites"] == {"client1": ["aachen", "bochum", "bremen"]}
    assert len(one.clients["client1"]) == 6
    with pytest.raises(DataError, match="num_clients"):
        preset_partition("cityscapes", ds, num_clients=4)


def test_preset_cocostuff27(tmp_path):
    train_ids = tds.COCO_LAYOUT["train2017"][1]
    dom = {i: f for i, f in zip(train_ids, [0, 2, 119, 148, 156, 181])}  # person, vehicle, water, ground, sky, solid
    ds = CocoStuff27Dataset(tds.make_cocostuff(tmp_path, dominant=dom))
    p = preset_partition("cocostuff27", ds, seed=1, num_clients=2)
    assert p.strategy == "dirichlet" and p.meta["alpha"] == 0.5 and p.meta["preset"] == "cocostuff27"
    assert sorted(i for v in p.clients.values() for i in v) == sorted(train_ids)
    assert list(p.clients) == ["client1", "client2"] and all(p.clients.values())
    assert p.validation == {"val": tds.COCO_LAYOUT["val2017"][1]}
    hist = np.array(list(p.meta["dominant_class_counts"].values())).sum(axis=0)
    assert np.flatnonzero(hist).tolist() == [9, 11, 21, 23, 24, 26]
    assert preset_partition("cocostuff27", ds, seed=1, num_clients=2) == p


def test_preset_polyp_and_camvid_on_fixtures(tmp_path):
    polyp = FolderDataset(tds.make_folder_dataset(
        tmp_path, name="polyp", sites={"kvasir": {"train": 3, "test": 1}, "cvc_clinicdb": {"train": 2, "test": 2}}))
    p = preset_partition("polyp", polyp)
    assert {k: len(v) for k, v in p.clients.items()} == {"kvasir": 3, "cvc_clinicdb": 2}
    assert p.validation == {"kvasir": ["kvasir_test_000"], "cvc_clinicdb": ["cvc_clinicdb_test_000",
                                                                             "cvc_clinicdb_test_001"]}
    with pytest.raises(DataError, match="preset 'camvid'.*'0001TP'"):
        preset_partition("camvid", polyp)
    with pytest.raises(DataError, match="unknown partition preset 'nope'"):
        preset_partition("nope", polyp)


def test_preset_table_states_what_the_presets_build(tmp_path):
    """Jobs read the table's counts without the data: they must be what the presets build on each dataset."""
    camvid = FolderDataset(tds.make_folder_dataset(
        tmp_path / "c", name="camvid", classes=tuple(f"c{i}" for i in range(11)),
        sites={s: {"train": 2} for s in ("0001TP", "0006R0", "0016E5", "Seq05VD")}))
    polyp = FolderDataset(tds.make_folder_dataset(
        tmp_path / "p", name="polyp", classes=("bg", "polyp"),
        sites={"kvasir": {"train": 2, "test": 1}, "cvc_clinicdb": {"train": 2, "test": 1}}))
    cityscapes = CityscapesDataset(tds.make_cityscapes(tmp_path / "cs"))
    coco = CocoStuff27Dataset(tds.make_cocostuff(tmp_path / "cc"))
    built = {"camvid": (camvid, None), "polyp": (polyp, None), "cityscapes": (cityscapes, None),
             "cocostuff27": (coco, 2)}  # the fixture has too few images for the default 18 clients
    assert set(built) == set(PRESETS)
    for name, (ds, clients) in built.items():
        preset, part = PRESETS[name], preset_partition(name, ds, num_clients=clients)
        assert ds.name == preset.dataset and part.num_classes == preset.num_clusters, name
        assert len(part.clients) == (clients or preset.clients), name
        assert len(set(part.validation) - set(part.clients)) == preset.validation_only, name
        assert preset.num_sites(clients) == len(set(part.clients) | set(part.validation)), name
        assert preset_site_names(name, clients) == (list(part.clients),
                                                    [s for s in part.validation if s not in part.clients]), name
        assert not preset.client_choices or preset.clients in preset.client_choices, name


@pytest.mark.realdata
def test_camvid_preset_real_data():
    from fuss_components.paths import data_root

    try:
        root = data_root()
    except FileNotFoundError as exc:
        pytest.skip(f"shared data not found ({exc})")
    if not (Path(root) / "camvid").is_dir():
        pytest.skip(f"camvid not found under {root}: set FUSS_SHARED (or FUSS_DATA_ROOT) to the shared assets")
    ds = open_dataset("camvid", root)
    assert ds.num_classes == 11 and len(ds) == 701
    p = preset_partition("camvid", ds)
    p.validate(ds)
    assert {k: len(v) for k, v in p.clients.items()} == {"0001TP": 124, "0006R0": 101, "0016E5": 305}
    assert {k: len(v) for k, v in p.validation.items()} == {"Seq05VD": 171}
    lab = ds.load_label(p.validation["Seq05VD"][0])
    assert lab.shape == (360, 480) and lab.dtype == np.uint8
    values = np.unique(lab)
    assert ((values < 11) | (values == 255)).all() and (values < 11).any()
