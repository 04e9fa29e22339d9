"""Feature cache: files and shapes, no re-extraction, cache keys, resumable extraction, damage, checksums, write
failures (full disk, unwritable folder), kNN."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import fuss_components.cache as cache_mod
from fuss_components.backbones import Backbone, load_backbone
from fuss_components.cache import CacheError, FeatureCache
from fuss_components import views as views_module
from fuss_components.views import build_knn
from fuss_components.datasets import DataError, open_dataset
from fuss_components.transforms import eval_size, eval_view, five_crop_views

from conftest import make_tiny_dataset, tiny_config

TINY_H, TINY_W = 40, 56  # image size of make_tiny_dataset


class CountingBackbone:
    """Wraps a Backbone and counts features() calls and images seen; `fail=True` makes every call raise."""

    def __init__(self, inner: Backbone, fail: bool = False):
        self.inner, self.fail = inner, fail
        self.calls, self.images = 0, 0
        self.model, self.patch_size = inner.model, inner.patch_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise AssertionError("the backbone must not be called")
        self.calls += 1
        self.images += images.shape[0]
        return self.inner.features(images)


@pytest.fixture
def ds(tiny_data_root):
    return open_dataset("tiny", tiny_data_root)


@pytest.fixture
def ids(ds):
    return ds.ids(site="s1")  # 6 images


@pytest.fixture
def no_backbone_load(monkeypatch):
    """Make any attempt of the cache to load a backbone itself fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("load_backbone must not be called")
    monkeypatch.setattr(cache_mod, "load_backbone", refuse)


def npy_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".npy")


def mtimes(cache: FeatureCache, kind: str, ids) -> dict[str, int]:
    return {i: cache.path(kind, i).stat().st_mtime_ns for i in ids}


# ---------------------------------------------------------------------------- extraction

def test_ensure_writes_one_file_per_id_and_kind(tiny_cfg, ds, ids):
    cache = FeatureCache(tiny_cfg, "tiny")
    counts = cache.ensure(ds, ids, ["train", "eval"], progress=False)
    assert counts == {"train": 6, "eval": 6}
    eh, ew = eval_size(TINY_H, TINY_W, tiny_cfg.data.eval_short_side, 14)
    assert (eh, ew) == (42, 56)
    for kind, shape in (("train", (5, 32, 2, 2)), ("eval", (32, eh // 14, ew // 14))):
        folder = cache.dir(kind)
        assert folder.parent == Path(tiny_cfg.cache_dir) and folder.name.startswith(kind + "-")
        assert npy_files(folder) == sorted(f"{i}.npy" for i in ids)
        assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]  # no temporary leftovers
        assert (folder / "cache.json").is_file()
        for i in ids:
            arr = np.load(cache.path(kind, i))
            assert arr.shape == shape and arr.dtype == np.float16
            assert np.isfinite(arr).all()
    assert cache.missing("train", ids) == [] and cache.missing("eval", ids) == []


def test_cached_values_are_the_backbone_features(tiny_cfg, ds, ids):
    cache = FeatureCache(tiny_cfg, "tiny")
    cache.ensure(ds, ids[:3], ["train", "eval"], progress=False, batch_images=2)
    backbone = load_backbone(tiny_cfg.backbone)
    for image_id in ids[:3]:  # batches [0, 1] and [2]: each image's features land in its own file
        image = ds.load_image(image_id)
        train = backbone.features(five_crop_views(image, tiny_cfg.data.crop_ratio, 28)).half()
        cached = torch.from_numpy(np.load(cache.path("train", image_id)))
        assert torch.allclose(cached.float(), train.float(), atol=2e-3), image_id
        whole = backbone.features(eval_view(image, tiny_cfg.data.eval_short_side, 14)[None])[0].half()
        assert torch.allclose(cache.load_eval(image_id).float(), whole.float(), atol=2e-3), image_id
    # the five views of an image are different crops, so their features differ
    views = np.load(cache.path("train", ids[0])).astype(np.float32)
    assert not np.allclose(views[0], views[4], atol=1e-2)


def test_mirror_features_are_the_mirrored_images_features_mirrored_back(tiny_cfg, ds, ids):
    cache = FeatureCache(tiny_cfg, "tiny")
    assert cache.eval_kinds == ("eval", "mirror")  # data.eval_flip is on by default
    cache.ensure(ds, ids[:2], cache.eval_kinds, progress=False)
    backbone = load_backbone(tiny_cfg.backbone)
    for image_id in ids[:2]:
        view = eval_view(ds.load_image(image_id), tiny_cfg.data.eval_short_side, 14)[None]
        mirrored = backbone.features(view.flip(-1))[0].flip(-1).half()
        assert torch.allclose(cache.load_mirror(image_id).float(), mirrored.float(), atol=2e-3), image_id
        # a ViT is not mirror-symmetric: the second view adds information
        assert not torch.allclose(cache.load_mirror(image_id).float(), cache.load_eval(image_id).float(), atol=1e-2)
    assert FeatureCache(tiny_cfg.with_overrides({"data.eval_flip": False}), "tiny").eval_kinds == ("eval",)


def test_rerun_extracts_nothing_and_never_calls_backbone(tiny_cfg, ds, ids, no_backbone_load):
    cache = FeatureCache(tiny_cfg, "tiny")
    backbone = CountingBackbone(load_backbone(tiny_cfg.backbone))
    assert cache.ensure(ds, ids, ["train", "eval"], backbone=backbone, progress=False) == {"train": 6, "eval": 6}
    assert backbone.calls > 0 and backbone.images == 6 * 5 + 6
    before = {k: mtimes(cache, k, ids) for k in ("train", "eval")}
    refusing = CountingBackbone(load_backbone(tiny_cfg.backbone), fail=True)
    again = FeatureCache(tiny_cfg, "tiny")  # a fresh object, as in a new process
    assert again.ensure(ds, ids, ["train", "eval"], backbone=refusing, progress=False) == {"train": 0, "eval": 0}
    # with no backbone given, nothing is loaded either (no_backbone_load would raise)
    assert again.ensure(ds, ids, ["train", "eval"], progress=False) == {"train": 0, "eval": 0}
    assert {k: mtimes(cache, k, ids) for k in ("train", "eval")} == before


def test_loads_backbone_only_when_needed(tiny_cfg, ds, ids, monkeypatch):
    loads = []
    real = cache_mod.load_backbone
    monkeypatch.setattr(cache_mod, "load_backbone", lambda *a, **k: loads.append(1) or real(*a, **k))
    cache = FeatureCache(tiny_cfg, "tiny")
    cache.ensure(ds, ids[:2], ["train", "eval"], progress=False)
    assert len(loads) == 1  # once for both kinds
    cache.ensure(ds, ids[:2], ["train", "eval"], progress=False)
    assert len(loads) == 1


def test_train_size_must_be_multiple_of_patch(tiny_data_root, tmp_path, ds, ids):
    cfg = tiny_config(tiny_data_root, tmp_path / "cache", **{"data.train_size": 30})
    with pytest.raises(DataError, match="train_size=30"):
        FeatureCache(cfg, "tiny").ensure(ds, ids[:1], ["train"], progress=False)


# ---------------------------------------------------------------------------- cache keys

def _weights_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model("fuss_tiny_vit_patch14", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("override, changes", [
    ({"backbone.block": 0}, {"train", "eval"}),
    ({"data.train_size": 42}, {"train"}),
    ({"data.crop_ratio": 0.75}, {"train"}),
    ({"data.eval_short_side": 56}, {"eval"}),
    ({"train.lr_head": 1e-3}, set()),
    ({"train.num_clusters": 5, "federation.rounds": 7, "loss.grid": 5}, set()),
    ({"data.root": "/elsewhere"}, set()),
])
def test_cache_key_invalidation(tiny_data_root, tmp_path, override, changes):
    base = FeatureCache(tiny_config(tiny_data_root, tmp_path), "tiny")
    other = FeatureCache(tiny_config(tiny_data_root, tmp_path, **override), "tiny")
    for kind in ("train", "eval"):
        if kind in changes:
            assert other.dir(kind) != base.dir(kind), (override, kind)
        else:
            assert other.dir(kind) == base.dir(kind), (override, kind)
    assert base.dir("train") != base.dir("eval")


def test_cache_key_follows_weights_file_and_dataset(tiny_data_root, tmp_path):
    a = _weights_file(tmp_path / "a.safetensors", 1)
    b = _weights_file(tmp_path / "b.safetensors", 2)
    copy = tmp_path / "copy_of_a.safetensors"
    copy.write_bytes(a.read_bytes())

    def cache(weights: Path | str, name: str = "tiny") -> FeatureCache:
        return FeatureCache(tiny_config(tiny_data_root, tmp_path / "c", **{"backbone.weights": str(weights)}), name)

    for kind in ("train", "eval"):
        assert cache(a).dir(kind) != cache(b).dir(kind)
        assert cache(a).dir(kind) != cache("random").dir(kind)
        assert cache(a).dir(kind) == cache(copy).dir(kind)  # same content, same numbers
        assert cache(a).dir(kind) != cache(a, "other").dir(kind)
    # the same path with new content gets a new key
    old = cache(a).dir("train")
    stat = os.stat(a)
    _weights_file(a, 3)
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    assert cache(a).dir("train") != old


def test_dataset_name_defaults_to_config(tiny_cfg):
    assert FeatureCache(tiny_cfg).dir("train") == FeatureCache(tiny_cfg, "tiny").dir("train")
    with pytest.raises(ValueError, match="kind"):
        FeatureCache(tiny_cfg).key("test")


# ---------------------------------------------------------------------------- interruption and damage

@pytest.mark.parametrize("k", [1, 4, 5])
def test_interrupted_extraction_resumes(tiny_cfg, ds, ids, monkeypatch, k):
    """The dataset fails on image k (0-based): images 0..k-1 are kept, a rerun extracts only the rest."""
    real_load = ds.load_image
    loaded = []

    def flaky(image_id):
        if len(loaded) == k:
            raise DataError(f"simulated failure reading {image_id}")
        loaded.append(image_id)
        return real_load(image_id)

    monkeypatch.setattr(ds, "load_image", flaky)
    cache = FeatureCache(tiny_cfg, "tiny")
    with pytest.raises(DataError, match=f"simulated failure reading {ids[k]}"):
        cache.ensure(ds, ids, ["train"], progress=False, batch_images=4)
    assert npy_files(cache.dir("train")) == sorted(f"{i}.npy" for i in ids[:k])
    assert cache.missing("train", ids) == ids[k:]
    before = mtimes(cache, "train", ids[:k])

    monkeypatch.setattr(ds, "load_image", real_load)
    backbone = CountingBackbone(load_backbone(tiny_cfg.backbone))
    counts = cache.ensure(ds, ids, ["train"], backbone=backbone, progress=False)
    assert counts == {"train": len(ids) - k}
    assert backbone.images == 5 * (len(ids) - k)
    assert mtimes(cache, "train", ids[:k]) == before  # earlier files untouched
    assert npy_files(cache.dir("train")) == sorted(f"{i}.npy" for i in ids)


def test_unreadable_image_stops_before_any_extraction_naming_its_path(tiny_cfg, tmp_path, monkeypatch):
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 6})
    ds = open_dataset("tiny", root)
    ids = ds.ids()
    bad = ds.sample(ids[3]).image_path
    Path(bad).write_bytes(b"this is not a jpeg")
    monkeypatch.setattr(cache_mod, "load_backbone", lambda *a, **k: pytest.fail("no backbone before the checks"))
    cache = FeatureCache(tiny_cfg, "tiny")
    with pytest.raises(DataError) as err:
        cache.ensure(ds, ids, ["train", "eval"], progress=False, batch_images=4)
    assert str(err.value).startswith(f"cannot read image {bad}: ")
    assert str(err.value).endswith("(data.on_bad_image='fail'; 'skip' leaves such images out)")
    assert not cache.dir("train").exists() and not cache.dir("eval").exists()


def test_image_whose_data_is_truncated_fails_when_read_keeping_earlier_files(tiny_cfg, tmp_path):
    """The header of a truncated JPEG reads, so the checks pass it; reading it stops the extraction, naming it,
    and the images read before it stay cached."""
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 6})
    ds = open_dataset("tiny", root)
    ids = ds.ids()
    bad = Path(ds.sample(ids[3]).image_path)
    bad.write_bytes(bad.read_bytes()[:-300])  # the header and part of the data
    cache = FeatureCache(tiny_cfg, "tiny")
    assert ds.check(ids) == {}
    with pytest.raises(DataError) as err:
        cache.ensure(ds, ids, ["train", "eval"], progress=False, batch_images=4)
    assert str(bad) in str(err.value) and "on_bad_image" in str(err.value)
    assert npy_files(cache.dir("train")) == sorted(f"{i}.npy" for i in ids[:3])
    for i in ids[:3]:
        assert np.load(cache.path("train", i)).shape == (5, 32, 2, 2)
    assert not cache.path("train", ids[4]).exists()


def test_checks_run_for_every_kind_before_the_first_extraction(tiny_cfg, tmp_path, monkeypatch):
    """A bad validation label stops `ensure_each` before the training views are extracted."""
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 4, "s3": 3})
    ds = open_dataset("tiny", root)
    label = ds.sample("s3_001").label_path
    label.unlink()
    monkeypatch.setattr(cache_mod, "load_backbone", lambda *a, **k: pytest.fail("no backbone before the checks"))
    cache = FeatureCache(tiny_cfg, "tiny")
    with pytest.raises(DataError, match=f"^label file missing: {label} "):
        cache.ensure_each(ds, {"train": ds.ids(site="s1"), "eval": ds.ids(site="s3")}, progress=False)


def test_skip_records_each_bad_file_with_its_reason_and_extracts_the_rest(tiny_data_root, tmp_path):
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 4, "s3": 3})
    ds = open_dataset("tiny", root)
    missing_image = ds.sample("s1_001").image_path
    missing_image.unlink()
    label = ds.sample("s3_002").label_path
    from PIL import Image

    Image.fromarray(np.zeros((TINY_H, TINY_W + 1), np.uint8)).save(label)  # one pixel wider than its image
    cfg = tiny_config(root, tmp_path / "cache", **{"data.on_bad_image": "skip"})
    cache = FeatureCache(cfg, "tiny")
    counts = cache.ensure_each(ds, {"train": ds.ids(site="s1"), "eval": ds.ids(site="s3")}, progress=False)
    assert counts == {"train": 3, "eval": 2}
    assert cache.skipped == {
        "mirror": {},  # not asked for here
        "train": {"s1_001": f"image file missing: {missing_image}"},
        "eval": {"s3_002": f"label {label} is 57x40 but image {ds.sample('s3_002').image_path} is 56x40 "
                           f"(width x height)"}}
    assert cache.usable("eval", ds.ids(site="s3")) == ["s3_000", "s3_001"]
    # the same object neither re-checks nor retries them
    assert cache.check(ds, {"train": ds.ids(site="s1"), "eval": ds.ids(site="s3")}) == {}


def test_ids_must_be_the_datasets_and_listed_once_even_when_cached(tiny_cfg, ds, ids, no_backbone_load):
    cache = FeatureCache(tiny_cfg, "tiny")
    cache.ensure(ds, ids, progress=False, backbone=load_backbone(tiny_cfg.backbone))
    with pytest.raises(DataError, match=f"^tiny: image id '{ids[0]}' is listed more than once$"):
        cache.ensure(ds, ids + ids[:1], progress=False)
    with pytest.raises(DataError, match="^tiny: unknown image id 'nope'$"):
        cache.check(ds, {"train": ["nope"]})


def test_truncated_file_is_detected_and_rebuilt(tiny_cfg, ds, ids):
    cache = FeatureCache(tiny_cfg, "tiny")
    cache.ensure(ds, ids[:3], ["train"], progress=False)
    path = cache.path("train", ids[1])
    good = np.load(path)
    blob = path.read_bytes()
    for cut in (len(blob) // 2, 60, 0):  # short data, short header, empty
        path.write_bytes(blob[:cut])
        assert not cache.is_valid("train", ids[1])
        assert cache.missing("train", ids[:3]) == [ids[1]]
    with pytest.raises(CacheError, match=str(path)):
        cache.load_train(ids[:3], knn=2)
    backbone = CountingBackbone(load_backbone(tiny_cfg.backbone))
    assert cache.ensure(ds, ids[:3], ["train"], backbone=backbone, progress=False) == {"train": 1}
    assert backbone.images == 5
    assert cache.is_valid("train", ids[1])
    np.testing.assert_array_equal(np.load(path), good)


def test_file_without_sidecar_is_never_adopted_but_rebuilt(tiny_cfg, tiny_data_root, tmp_path, ds, ids, caplog):
    """Deleting the sidecar must not launder corrupted bytes: the file is a miss, loading it refuses, ensure()
    re-extracts exactly that image and the result is a fresh extraction's."""
    cache = FeatureCache(tiny_cfg, "tiny")
    cache.ensure(ds, ids[:3], ["train"], progress=False)
    path = cache.path("train", ids[1])
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF  # still a well-formed .npy of the right shape: only the checksum could tell
    corrupted = bytes(blob)
    path.write_bytes(corrupted)
    cache.checksum_path(path).unlink()
    with caplog.at_level("WARNING"):
        assert cache.missing("train", ids[:3]) == [ids[1]]
    assert str(path) in caplog.text and "checksum file" in caplog.text
    assert not cache.checksum_path(path).exists()  # nothing was adopted
    assert path.read_bytes() == corrupted
    with pytest.raises(CacheError) as err:
        cache.load_train(ids[:3], knn=2)
    assert str(path) in str(err.value) and "re-extract" in str(err.value)
    backbone = CountingBackbone(load_backbone(tiny_cfg.backbone))
    assert cache.ensure(ds, ids[:3], ["train"], backbone=backbone, progress=False) == {"train": 1}
    assert backbone.images == 5  # only that image
    assert path.read_bytes() != corrupted and cache.is_valid("train", ids[1])
    fresh = FeatureCache(tiny_config(tiny_data_root, tmp_path / "fresh"), "tiny")
    fresh.ensure(ds, [ids[1]], ["train"], progress=False)
    np.testing.assert_array_equal(np.load(path), np.load(fresh.path("train", ids[1])))
    assert cache.load_train(ids[:3], knn=2).num_images == 3


@pytest.mark.parametrize("kind, shape", [
    ("train", (4, 32, 2, 2)),  # four views
    ("train", (32, 2, 2)),  # one view, no view axis
    ("train", (5, 16, 2, 2)),  # another backbone's D'
    ("train", (5, 32, 3, 3)),  # another train_size
    ("eval", (1, 32, 3, 4)),  # a batch axis left in
    ("eval", (16, 3, 4)),  # another backbone's D'
])
def test_wrong_shape_with_valid_checksum_is_damaged_and_rebuilt(tiny_cfg, ds, ids, kind, shape):
    cache = FeatureCache(tiny_cfg, "tiny")
    cache.ensure(ds, ids[:2], [kind], progress=False)
    path = cache.path(kind, ids[0])
    good = path.read_bytes()
    FeatureCache._save(path, np.zeros(shape, np.float16))  # with a sidecar that matches the new bytes
    assert cache_mod._read_checksum(cache.checksum_path(path))["size"] == path.stat().st_size
    assert "shape" in cache.damage(kind, ids[0])
    assert not cache.is_valid(kind, ids[0]) and cache.missing(kind, ids[:2]) == [ids[0]]
    with pytest.raises(CacheError) as err:
        cache.load_train(ids[:2], knn=2) if kind == "train" else cache.load_eval(ids[0])
    assert str(path) in str(err.value) and f"shape {shape}" in str(err.value)
    assert cache.ensure(ds, ids[:2], [kind], progress=False) == {kind: 1}
    assert path.read_bytes() == good and cache.is_valid(kind, ids[0])


def test_expected_shape_follows_backbone_and_config(tiny_cfg, tiny_data_root, tmp_path):
    cache = FeatureCache(tiny_cfg, "tiny")
    assert cache.expected_shape("train") == (5, 32, 2, 2)
    assert cache.expected_shape("eval") == (32, "h", "w")
    bigger = FeatureCache(tiny_config(tiny_data_root, tmp_path, **{"data.train_size": 42}), "tiny")
    assert bigger.expected_shape("train") == (5, 32, 3, 3)
    unknown = FeatureCache(tiny_config(tiny_data_root, tmp_path, **{"backbone.name": "no_such_vit"}), "tiny")
    assert unknown.expected_shape("train") == (5, "D'", "s/p", "s/p")  # ndim and views are still checked
    assert unknown.shape_problem("train", (5, 7, 9, 9)) is None
    assert "expected (5, D', s/p, s/p)" in unknown.shape_problem("train", (4, 7, 9, 9))
    assert "expected (D', h, w)" in unknown.shape_problem("eval", (1, 7, 9, 9))
    with pytest.raises(ValueError, match="kind"):
        cache.expected_shape("test")


# ---------------------------------------------------------------------------- checksums and write failures


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
    adopted, so a deleted sidecar cannot launder corrupted bytes (the corrupted case:
    test_file_without_sidecar_is_never_adopted_but_rebuilt)."""
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
    assert npy_files(folder) == sorted(f"{i}.npy" for i in ids[:2])  # the ones before stay valid
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


# ---------------------------------------------------------------------------- loading and kNN

def test_load_train_and_eval(tiny_cfg, ds, ids):
    cache = FeatureCache(tiny_cfg, "tiny")
    cache.ensure(ds, ids, ["train", "eval"], progress=False)
    tf = cache.load_train(ids, knn=3)
    views = tf.views(torch.arange(30))
    assert views.shape == (30, 32, 2, 2) and tf.geometry == (32, 2, 2) and not tf.streamed
    assert tf.num_views == 30 and tf.num_images == 6
    assert tf.view_image_ids == [i for i in ids for _ in range(5)]
    np.testing.assert_array_equal(views[10:15].half().numpy(), np.load(cache.path("train", ids[2])))
    assert tf.knn.shape == (30, 3) and tf.knn.dtype == torch.long
    assert (tf.knn != torch.arange(30)[:, None]).all()
    assert torch.equal(tf.knn, build_knn(views, 3))
    ev = cache.load_eval(ids[0])
    assert ev.shape == (32, 3, 4) and ev.dtype == torch.float16


def test_load_train_missing_names_path(tiny_cfg):
    cache = FeatureCache(tiny_cfg, "tiny")
    with pytest.raises(CacheError, match="s1_000.npy"):
        cache.load_train(["s1_000"], knn=2)
    with pytest.raises(DataError):
        cache.load_train([], knn=2)


def _views_with_descriptors(desc: torch.Tensor, h: int = 2, w: int = 3) -> torch.Tensor:
    """(N, D, h, w) maps whose spatial mean is exactly `desc` but which vary over space."""
    n, d = desc.shape
    wiggle = torch.zeros(n, d, h, w)
    wiggle[..., 0, 0], wiggle[..., -1, -1] = 5.0, -5.0
    return desc[:, :, None, None] + wiggle


def test_build_knn_expected_order(monkeypatch):
    angles = [0.0, 20.0, 50.0, 120.0]
    scales = [1.0, 3.0, 0.5, 2.0]  # cosine ignores the norm
    desc = torch.tensor([[s * math.cos(math.radians(a)), s * math.sin(math.radians(a)), 0.0]
                         for a, s in zip(angles, scales)])
    feats = _views_with_descriptors(desc)
    expected = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 0, 3], [2, 1, 0]])
    assert torch.equal(build_knn(feats, 3), expected)
    assert torch.equal(build_knn(feats, 2), expected[:, :2])
    assert torch.equal(build_knn(feats.half(), 1), expected[:, :1])
    assert torch.equal(build_knn(feats, 10), expected)  # k is capped at N - 1
    monkeypatch.setattr(views_module, "KNN_CHUNK_BYTES", 3 * 4 * 4)  # 3 rows of similarities at a time
    assert torch.equal(build_knn(feats, 3), expected)  # chunking does not change the result


def test_build_knn_never_includes_self(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 8, 2, 2, generator=gen)
    feats[7] = feats[3]  # exact duplicates: each is the other's nearest neighbour, never itself
    unchunked = build_knn(feats, 6)
    monkeypatch.setattr(views_module, "KNN_CHUNK_BYTES", 16 * 50 * 4)
    knn = build_knn(feats, 6)
    assert knn.shape == (50, 6)
    assert (knn != torch.arange(50)[:, None]).all()
    assert knn[3, 0] == 7 and knn[7, 0] == 3
    assert all(len(set(row.tolist())) == 6 for row in knn)
    assert torch.equal(knn, unchunked)
    # brute force reference
    d = torch.nn.functional.normalize(feats.mean(dim=(2, 3)), dim=1)
    sim = d @ d.T
    sim.fill_diagonal_(-2)
    assert torch.equal(knn, sim.topk(6, dim=1).indices)


def test_build_knn_needs_two_views():
    with pytest.raises(DataError, match="2 views"):
        build_knn(torch.randn(1, 4, 2, 2), 3)


# ---------------------------------------------------------------------------- extraction passes and batches

class RecordingBackbone(CountingBackbone):
    """CountingBackbone that also records each batch's input shape."""

    def __init__(self, inner: Backbone):
        super().__init__(inner)
        self.shapes: list[tuple[int, ...]] = []

    def features(self, images: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(images.shape))
        return super().features(images)


def test_an_images_eval_and_mirror_views_share_one_backbone_pass(tiny_cfg, ds, ids):
    cache = FeatureCache(tiny_cfg, "tiny")
    backbone = RecordingBackbone(load_backbone(tiny_cfg.backbone))
    assert cache.ensure(ds, ids, cache.eval_kinds, backbone=backbone, progress=False, batch_images=4) == \
        {"eval": 6, "mirror": 6}
    # 6 images, each read once, in batches of 4 + 2 images of 2 views each (two passes of one kind each: 4 calls)
    assert [s[0] for s in backbone.shapes] == [8, 4] and backbone.images == 12
    only_mirror = FeatureCache(tiny_cfg, "tiny")
    for image_id in ids[:3]:
        only_mirror.path("mirror", image_id).unlink()
    backbone = RecordingBackbone(load_backbone(tiny_cfg.backbone))
    assert only_mirror.ensure(ds, ids, cache.eval_kinds, backbone=backbone, progress=False) == {"eval": 0, "mirror": 3}
    assert backbone.images == 3  # the missing mirror views only
    reference = load_backbone(tiny_cfg.backbone)
    for image_id in ids[:3]:
        view = eval_view(ds.load_image(image_id), tiny_cfg.data.eval_short_side, 14)[None]
        mirrored = reference.features(view.flip(-1))[0].flip(-1).half()
        assert torch.allclose(only_mirror.load_mirror(image_id).float(), mirrored.float(), atol=2e-3)


def test_whole_images_of_one_size_share_batches(tiny_cfg, tmp_path):
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 6})
    ds = open_dataset("tiny", root)
    ids = ds.ids()
    from PIL import Image

    for image_id in ids[1::2]:  # every other image twice as wide: sizes alternate in the dataset's order
        sample = ds.sample(image_id)
        Image.open(sample.image_path).resize((2 * TINY_W, TINY_H)).save(sample.image_path, quality=95)
        Image.open(sample.label_path).resize((2 * TINY_W, TINY_H), Image.NEAREST).save(sample.label_path)
    backbone = RecordingBackbone(load_backbone(tiny_cfg.backbone))
    cfg = tiny_cfg.with_overrides({"data.eval_flip": False})
    FeatureCache(cfg, "tiny").ensure(ds, ids, ["eval"], backbone=backbone, progress=False, batch_images=4)
    assert [s[0] for s in backbone.shapes] == [3, 3]  # without sorting by size: six batches of one image
    assert len({s[-1] for s in backbone.shapes}) == 2


def test_dataloader_workers_write_the_same_features(tiny_cfg, tmp_path, ds, ids):
    serial = FeatureCache(tiny_cfg, "tiny")
    serial.ensure(ds, ids, ["train", "eval"], progress=False)
    workers = FeatureCache(tiny_config(tiny_cfg.data.root, tmp_path / "other",
                                       **{"data.extract_workers": 2, "data.extract_batch": 3}), "tiny")
    workers.ensure(ds, ids, ["train", "eval"], progress=False)
    for kind in ("train", "eval"):
        for image_id in ids:
            assert np.array_equal(np.load(serial.path(kind, image_id)), np.load(workers.path(kind, image_id)))


def test_a_bad_image_read_by_a_worker_is_skipped_or_named(tiny_cfg, tmp_path):
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 5})
    ds = open_dataset("tiny", root)
    ids = ds.ids()
    bad = Path(ds.sample(ids[2]).image_path)
    bad.write_bytes(bad.read_bytes()[:-300])  # header reads, data does not: caught by the worker's read
    cfg = tiny_config(root, tmp_path / "cache", **{"data.extract_workers": 1})
    with pytest.raises(DataError) as err:
        FeatureCache(cfg, "tiny").ensure(ds, ids, ["train"], progress=False, batch_images=4)
    assert str(bad) in str(err.value)
    skipping = FeatureCache(cfg.with_overrides({"data.on_bad_image": "skip"}), "tiny")
    skipping.ensure(ds, ids, ["train"], progress=False)
    assert list(skipping.skipped["train"]) == [ids[2]] and str(bad) in skipping.skipped["train"][ids[2]]
    assert npy_files(skipping.dir("train")) == sorted(f"{i}.npy" for i in ids if i != ids[2])


def test_extraction_defaults_follow_the_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert cache_mod.extraction_workers(None, cpu) == 0 and cache_mod.extraction_workers(1, cpu) == 1
    assert cache_mod.extraction_workers(10_000, cpu) == (os.cpu_count() or 1)  # a hostile job's value is capped
    assert cache_mod.extraction_workers(None, gpu) == max(0, min(4, (os.cpu_count() or 1) - 1))
    assert (cache_mod.extraction_batch(None, cpu), cache_mod.extraction_batch(None, gpu)) == (4, 16)
    assert cache_mod.extraction_batch(7, gpu) == 7
    passes = cache_mod.extraction_passes({"train": ["a"], "eval": ["a", "b"], "mirror": ["b", "c"]})
    assert passes == [(("train",), ["a"]), (("eval",), ["a"]), (("eval", "mirror"), ["b"]), (("mirror",), ["c"])]


def test_backbone_autocast_is_part_of_the_cache_key_and_close_to_float32(tiny_cfg, ds, ids):
    half = tiny_cfg.with_overrides({"backbone.autocast": "bfloat16"})
    full_cache, half_cache = FeatureCache(tiny_cfg, "tiny"), FeatureCache(half, "tiny")
    assert full_cache.key("train") != half_cache.key("train")
    assert FeatureCache(tiny_cfg.with_overrides({"backbone.autocast": "none"}), "tiny").key("train") == \
        full_cache.key("train")
    full_cache.ensure(ds, ids[:2], ["train"], progress=False)
    half_cache.ensure(ds, ids[:2], ["train"], progress=False)
    for image_id in ids[:2]:
        a = np.load(full_cache.path("train", image_id)).astype(np.float32)
        b = np.load(half_cache.path("train", image_id)).astype(np.float32)
        assert not np.array_equal(a, b)  # really computed in bfloat16
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.98


def test_a_projected_cache_stores_fewer_channels_and_trains(tiny_cfg, ds, ids):
    from fuss_components.site import Site, init_global_state, resolve_partition

    cfg = tiny_cfg.with_overrides({"backbone.project_dim": 16})
    cache = FeatureCache(cfg, "tiny")
    assert cache.key("train") != FeatureCache(tiny_cfg, "tiny").key("train")
    cache.ensure(ds, ids[:2], ["train", "eval"], progress=False)
    assert np.load(cache.path("train", ids[0])).shape == (5, 16, 2, 2)
    assert cache.bytes_needed(ds, "train", ids) == 6 * (5 * 16 * 2 * 2 * 2 + 228)  # half of 32 channels' bytes
    site = Site(cfg, "s1", resolve_partition(cfg))
    result = site.train(init_global_state(cfg), 0)
    assert result.state["head.linear.weight"].shape[1] == 16
    scores = Site(cfg, "s3", resolve_partition(cfg)).validate(result.state)  # evaluation reads projected features
    assert 0.0 <= scores["miou"] <= 1.0 and scores["num_images"] == len(ds.ids(site="s3"))
