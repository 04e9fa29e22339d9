"""Partitions: dominant class, by-site / Dirichlet / IID / missing-class splits, presets (the label-skewed ones
too), manifest round trip and checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import test_datasets as tds  # the fixture builders (official Cityscapes / COCO-Stuff layouts, folder layout)
from fuss_components.datasets import CityscapesDataset, CocoStuff27Dataset, DataError, FolderDataset, open_dataset
from fuss_components.partition import (
    Partition,
    dominant_class,
    label_class_pixels,
    partition_by_site,
    partition_dirichlet,
    partition_iid,
    partition_missing_classes,
)
from fuss_components.presets import PRESETS, PartitionSpec, parse_partition_spec, preset_partition, preset_site_names
from fuss_components.site import flare_client_name

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


CAMVID_TRAINING = ("0001TP", "0006R0", "0016E5")
CAMVID_DOMINANT = (0, 1, 3, 5, 8)  # the dominant classes of CamVid's real training frames
SKEWED_CAMVID = ("camvid-dir0.1", "camvid-dir0.5", "camvid-missing")
SKEWED_POLYP = ("polyp-dir0.1", "polyp-dir0.5", "polyp-missing")
POLYP_HOSPITALS = ("kvasir", "cvc_clinicdb")


def _unreadable_labels(ds: FolderDataset, ids) -> None:
    """Overwrite these labels with bytes no image reader accepts: a partition that reads them fails."""
    for i in ids:
        ds.sample(i).label_path.write_bytes(b"not a png")


@pytest.fixture(scope="module")
def camvid_like(tmp_path_factory) -> FolderDataset:
    """CamVid's layout: 60 training frames (0001TP train+test, 0006R0, 0016E5 train+val) whose dominant classes
    cycle over CamVid's 5 real ones; Seq05VD (6 frames) has unreadable labels, so no partition may read them."""
    sites = {"0001TP": {"train": 12, "test": 8}, "0006R0": {"train": 16}, "0016E5": {"train": 16, "val": 8},
             "Seq05VD": {"test": 6}}
    dominant = [CAMVID_DOMINANT[n % len(CAMVID_DOMINANT)] for n in range(66)]
    ds = FolderDataset(tds.make_folder_dataset(tmp_path_factory.mktemp("camvid"), name="camvid",
                                               classes=tuple(f"c{k}" for k in range(11)), sites=sites,
                                               size=(8, 8), dominant=dominant))
    _unreadable_labels(ds, ds.ids(site="Seq05VD"))
    return ds


@pytest.fixture(scope="module")
def polyp_like(tmp_path_factory) -> FolderDataset:
    """The polyp layout: kvasir 16 train + 3 test, cvc_clinicdb 12 train + 2 test; image n's label is a polyp of
    1 + (7 n mod 97) pixels out of 256 (all different), so every hospital has 4 distinct polyp-size quartiles.
    The test labels are unreadable: the presets must not read them."""
    root = tds.make_folder_dataset(tmp_path_factory.mktemp("polyp"), name="polyp", classes=("background", "polyp"),
                                   sites={"kvasir": {"train": 16, "test": 3}, "cvc_clinicdb": {"train": 12, "test": 2}},
                                   size=(16, 16))
    ds = FolderDataset(root)
    for n, sample in enumerate(ds.samples()):
        lab = np.zeros((16, 16), np.uint8)
        lab.flat[: _polyp_area(n)] = 1
        Image.fromarray(lab).save(sample.label_path)
    _unreadable_labels(ds, ds.ids(split="test"))
    return ds


def _polyp_area(n: int) -> int:
    return 1 + (7 * n) % 97


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


# ---------------------------------------------------------------------------------------------- missing classes
def test_missing_classes_each_client_lacks_half_of_the_classes(skew_ds):
    ids = skew_ds.ids()
    truth = {i: dominant_class(skew_ds.load_label(i)) for i in ids}
    p = partition_missing_classes(skew_ds, ids, 4, seed=2, progress=False)
    assert p.strategy == "missing" and list(p.clients) == ["client1", "client2", "client3", "client4"]
    all_ids = [i for v in p.clients.values() for i in v]
    assert sorted(all_ids) == sorted(ids) and len(all_ids) == len(ids)
    seen = p.meta["classes_seen"]
    assert set().union(*map(set, seen.values())) == set(range(1, N_CLASSES + 1))  # every class has a client
    for client, members in p.clients.items():
        assert len(seen[client]) == N_CLASSES // 2  # sees 3 of the 6 classes, lacks the other 3 entirely
        assert {truth[i] for i in members} == set(seen[client]), client
    hist = np.array(list(p.meta["dominant_class_counts"].values()))
    assert hist.sum(axis=0).tolist() == [0] + [PER_CLASS] * N_CLASSES
    # each class's images are dealt evenly to the clients that see it
    for c in range(1, N_CLASSES + 1):
        shares = sorted(n for n in hist[:, c] if n)
        assert shares[-1] - shares[0] <= 1 and sum(shares) == PER_CLASS
    assert partition_missing_classes(skew_ds, ids, 4, seed=2, dominant=truth) == p
    assert partition_missing_classes(skew_ds, ids, 4, seed=3, dominant=truth).clients != p.clients
    p.validate(skew_ds)


def test_missing_classes_errors(skew_ds):
    ids = skew_ds.ids()[:12]
    dom = {i: 1 + n % 3 for n, i in enumerate(ids)}
    with pytest.raises(DataError, match="at least 2 clients"):
        partition_missing_classes(skew_ds, ids, 1, 0, dominant=dom)
    with pytest.raises(DataError, match=r"at least 2 classes.*\[4\]"):
        partition_missing_classes(skew_ds, ids, 3, 0, dominant={i: 4 for i in ids})
    with pytest.raises(DataError, match=r"left client 'client\d+' \(classes \[\d, \d\]\) empty"):
        partition_missing_classes(skew_ds, ids, 12, 0, dominant=dom)  # 4 images per class, 8 clients per class


def test_label_class_pixels_counts_and_sees_a_rewritten_label(mini_ds):
    (counts,) = label_class_pixels(mini_ds, ["s1_train_001"], progress=False).values()
    assert counts.tolist() == [32, 0, 144]  # 12x16 label: 9 rows of class 2, 2 of class 0, 1 ignore row
    path = mini_ds.sample("s1_train_001").label_path
    Image.fromarray(np.full((12, 16), 1, np.uint8)).save(path)
    assert label_class_pixels(mini_ds, ["s1_train_001"], progress=False)["s1_train_001"].tolist() == [0, 192, 0]


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


def test_preset_table_states_what_the_presets_build(tmp_path, camvid_like, polyp_like):
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
             "cocostuff27": (coco, 2),  # the fixture has too few images for the default 18 clients
             **{name: (camvid_like, None) for name in SKEWED_CAMVID},
             **{name: (polyp_like, None) for name in SKEWED_POLYP}}
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


# ---------------------------------------------------------------------------------------------- label-skewed presets
@pytest.mark.parametrize("clients", [6, 12])
@pytest.mark.parametrize("name", SKEWED_CAMVID)
def test_skewed_camvid_presets(name, clients, camvid_like, tmp_path):
    ds = camvid_like
    p = preset_partition(name, ds, seed=0, num_clients=clients)
    assert p == preset_partition(name, ds, seed=0, num_clients=clients)  # reproducible for a seed
    assert p.clients != preset_partition(name, ds, seed=1, num_clients=clients).clients
    assert p.meta["preset"] == name and p.strategy == ("missing" if name.endswith("missing") else "dirichlet")
    assert list(p.clients) == [f"client{k}" for k in range(1, clients + 1)] and all(p.clients.values())
    training = [i for s in CAMVID_TRAINING for i in ds.ids(site=s)]  # every frame, whatever its split
    held = [i for v in p.clients.values() for i in v]
    assert sorted(held) == sorted(training) and len(held) == len(training) == 60
    assert p.validation == {"Seq05VD": ds.ids(site="Seq05VD")}  # held out, and its labels never read
    assert preset_site_names(name, clients) == (list(p.clients), ["Seq05VD"])
    assert PRESETS[name].num_sites(clients) == clients + 1 and clients in PRESETS[name].client_choices
    p.validate(ds)
    assert Partition.load(p.save(tmp_path / "m.json")) == p


def test_camvid_missing_clients_lack_classes(camvid_like):
    p = preset_partition("camvid-missing", camvid_like, seed=0, num_clients=6)
    seen = p.meta["classes_seen"]
    assert set().union(*map(set, seen.values())) == set(CAMVID_DOMINANT)
    for client, members in p.clients.items():
        classes = {dominant_class(camvid_like.load_label(i)) for i in members}
        assert len(seen[client]) == 3 and classes <= set(seen[client]), client
        assert len(set(CAMVID_DOMINANT) - classes) >= 2, client  # lacks at least 2 of the 5 classes entirely


def test_camvid_dirichlet_presets_small_alpha_is_more_skewed(camvid_like):
    def mean_entropy(name: str) -> float:
        return float(np.mean([_entropy(h) for seed in range(4) for h in preset_partition(
            name, camvid_like, seed=seed).meta["dominant_class_counts"].values()]))

    assert preset_partition("camvid-dir0.1", camvid_like).meta["alpha"] == 0.1
    assert mean_entropy("camvid-dir0.1") < mean_entropy("camvid-dir0.5")


def _polyp_quartiles(ds: FolderDataset, hospital: str) -> dict[str, int]:
    """Rank quartile of each train image's polyp area within its hospital, from the fixture's construction."""
    area = {s.id: _polyp_area(n) for n, s in enumerate(ds.samples())}
    ids = sorted(ds.ids(site=hospital, split="train"), key=area.__getitem__)
    return {i: 4 * r // len(ids) for r, i in enumerate(ids)}


@pytest.mark.parametrize("clients", [4, 6])
@pytest.mark.parametrize("name", SKEWED_POLYP)
def test_skewed_polyp_presets(name, clients, polyp_like):
    ds = polyp_like
    p = preset_partition(name, ds, seed=0, num_clients=clients)
    assert p == preset_partition(name, ds, seed=0, num_clients=clients)
    per = clients // 2
    assert list(p.clients) == [f"{h}-{j}" for h in POLYP_HOSPITALS for j in range(1, per + 1)]
    assert all(p.clients.values())
    for h in POLYP_HOSPITALS:  # each hospital's train images in exactly one of its own clients
        held = [i for j in range(1, per + 1) for i in p.clients[f"{h}-{j}"]]
        assert sorted(held) == sorted(ds.ids(site=h, split="train")) and len(held) == len(set(held))
    assert p.validation == {h: ds.ids(site=h, split="test") for h in POLYP_HOSPITALS}
    assert preset_site_names(name, clients) == (list(p.clients), list(POLYP_HOSPITALS))
    assert all(flare_client_name(s) == s for s in p.clients)  # valid FLARE client names as they are
    for h in POLYP_HOSPITALS:
        quartile = _polyp_quartiles(ds, h)
        for j in range(1, per + 1):
            client = f"{h}-{j}"
            assert p.meta["size_bin_counts"][client] == np.bincount(
                [quartile[i] for i in p.clients[client]], minlength=4).tolist(), client
            if name == "polyp-missing":
                assert len(p.meta["size_bins_seen"][client]) == 2
                assert {quartile[i] for i in p.clients[client]} <= set(p.meta["size_bins_seen"][client])
    p.validate(ds)


def test_skewed_polyp_presets_need_an_even_count(polyp_like):
    for clients in (2, 5):
        with pytest.raises(DataError, match=f"preset 'polyp-dir0.5': num_clients must be an even.*got {clients}"):
            preset_partition("polyp-dir0.5", polyp_like, num_clients=clients)
    with pytest.raises(DataError, match="even number"):
        preset_site_names("polyp-missing", 5)


@pytest.mark.parametrize(("name", "clients", "sites"), [
    ("camvid-missing", 12, [f"client{k}" for k in range(1, 13)] + ["Seq05VD"]),
    ("polyp-dir0.5", 6, ["kvasir-1", "kvasir-2", "kvasir-3", "cvc_clinicdb-1", "cvc_clinicdb-2", "cvc_clinicdb-3",
                         "kvasir", "cvc_clinicdb"]),
])
def test_skewed_preset_job_export_deploys_to_its_sites(name, clients, sites, tmp_path, capsys):
    """`fuss job export` (not run): the job's deploy map lists the preset's sites, known without the data."""
    from fuss_components.config import FussConfig
    from fuss_flare.job import main

    assert main(["export", "--preset", name, "--clients", str(clients), "--out", str(tmp_path)]) == 0
    job = tmp_path / f"fuss_{name}_{clients}clients"
    meta = json.loads((job / "meta.json").read_text())
    assert meta["deploy_map"] == {"app": ["server", *sites]}
    assert meta["min_clients"] == clients
    cfg = FussConfig.load(job / "app" / "config" / "fuss_config.json")
    assert cfg.partition == f"{name}:{clients}" and cfg.train.num_clusters == PRESETS[name].num_clusters
    assert f"-t {len(sites)}" in capsys.readouterr().out


def test_partition_histograms_benchmark(camvid_like, tmp_path):
    """benchmarks/partitions.py: per-client class histograms of a manifest, and its figure."""
    from benchmarks.partitions import plot, summarize

    part = preset_partition("camvid-missing", camvid_like, num_clients=6)
    summary = summarize(camvid_like, part)
    clients = summary["clients"]
    assert {k: c["images"] for k, c in clients.items()} == part.sizes()
    assert summary["validation"] == {"Seq05VD": 6} and summary["strategy"] == "missing"
    # each 8x8 training label: 6 rows of its dominant class, 1 row of class 0, 1 ignore row; 12 frames per class
    pixels = np.sum([c["class_pixels"] for c in clients.values()], axis=0)
    assert pixels.tolist() == [60 * 8 + 12 * 48, 576, 0, 576, 0, 576, 0, 0, 576, 0, 0]
    for name, c in clients.items():
        assert c["tags_seen"] == part.meta["classes_seen"][name]
        assert c["dominant_class_images"] == part.meta["dominant_class_counts"][name]
    png = plot(summary, "camvid-missing:6", camvid_like.classes, tmp_path / "partition.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


@pytest.mark.realdata
@pytest.mark.parametrize("dataset", ["camvid", "polyp"])
def test_skewed_presets_real_data_match_the_recorded_histograms(dataset):
    """The seed-0 manifests still build what docs/results/partitions_<dataset>.json records."""
    from benchmarks.partitions import RESULTS, skewed_presets, summarize
    from fuss_components.paths import data_root

    try:
        root = data_root()
    except FileNotFoundError as exc:
        pytest.skip(f"shared data not found ({exc})")
    if not (Path(root) / dataset).is_dir():
        pytest.skip(f"{dataset} not found under {root}: set FUSS_SHARED (or FUSS_DATA_ROOT) to the shared assets")
    ds = open_dataset(dataset, root)
    recorded = json.loads((RESULTS / f"partitions_{dataset}.json").read_text())["partitions"]
    built = {}
    for name in skewed_presets(dataset):
        for clients in PRESETS[name].client_choices:
            part = preset_partition(name, ds, seed=0, num_clients=clients)
            part.validate(ds)
            built[f"{name}:{clients}"] = summarize(ds, part)
    assert len(built) == 6 and set(built) == set(recorded)
    for key, summary in built.items():
        assert summary["clients"] == recorded[key]["clients"], key
        assert summary["validation"] == recorded[key]["validation"], key


@pytest.mark.parametrize("spec, expected", [
    ("camvid", PartitionSpec(preset="camvid")),
    ("cityscapes:6", PartitionSpec(preset="cityscapes", clients=6)),
    ("camvid-dir0.1:12", PartitionSpec(preset="camvid-dir0.1", clients=12)),
    ("site", PartitionSpec()),
    ("runs/federation.json", PartitionSpec(manifest=Path("runs/federation.json"))),  # need not exist yet
])
def test_the_partition_spec_has_one_grammar(spec, expected):
    assert parse_partition_spec(spec) == expected
    assert parse_partition_spec(spec).is_site == (spec == "site")


def test_an_existing_file_is_a_manifest_whatever_its_name_and_a_bad_spec_names_the_presets(tmp_path):
    manifest = tmp_path / "federation.manifest"
    manifest.write_text("{}")
    assert parse_partition_spec(str(manifest)) == PartitionSpec(manifest=manifest)
    for bad, message in [("camvd", "known presets: \\['camvid'"), ("camvid:0", "whole number >= 1"),
                         ("camvid:six", "whole number >= 1"), ("site:3", "neither a manifest")]:
        with pytest.raises(DataError, match=message):
            parse_partition_spec(bad)
