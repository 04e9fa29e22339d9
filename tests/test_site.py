"""Tests of fuss_components.site: site names (FLARE client names, simulator names), the seeded initial model,
resume from the site's saved local state, and unreadable images under ``data.on_bad_image``."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fuss_components.cache as cache_mod
from fuss_components.cache import CacheError
from fuss_components.config import FussConfig
from fuss_components.datasets import DataError, open_dataset
from fuss_components.partition import Partition, partition_sites
from fuss_components.runner import run_federated
from fuss_components.site import (Site, flare_client_name, init_global_state, resolve_partition, resolve_site_name,
                                  site_order)

from conftest import equal_states, make_tiny_dataset, tiny_config


def _site(cfg, name="s1"):
    return Site(cfg, name, resolve_partition(cfg))


# ============================================================================== site names


def test_flare_client_name_prefixes_names_flare_would_read_as_numbers_or_booleans():
    assert flare_client_name("0016E5") == "site-0016E5"  # CamVid's sequence: the float 1.6e6 on a command line
    assert flare_client_name("2") == "site-2"
    assert flare_client_name("nan") == "site-nan"
    assert flare_client_name("True") == "site-True"
    assert flare_client_name("null") == "site-null"
    assert flare_client_name("Seq05VD") == "Seq05VD"
    assert flare_client_name("s1") == "s1"


def test_resolve_site_name_accepts_the_site_its_flare_name_and_a_simulator_name():
    partition = Partition("camvid", "site", 0, 11, clients={"0016E5": ["a"], "b": ["c"]},
                          validation={"b": ["d"], "v": ["e"]})
    assert site_order(partition) == ["0016E5", "b", "v"]  # training sites, then validation-only ones
    assert resolve_site_name("0016E5", partition) == "0016E5"
    assert resolve_site_name("site-0016E5", partition) == "0016E5"
    assert [resolve_site_name(f"site-{n}", partition) for n in (1, 2, 3)] == ["0016E5", "b", "v"]
    for unknown in ("site-4", "site-0", "c"):
        with pytest.raises(DataError, match=f"site '{unknown}' is not in the partition"):
            resolve_site_name(unknown, partition)


def test_a_site_named_like_a_simulator_name_keeps_its_flare_name():
    """Site "2" is the FLARE client "site-2", although "site-2" would also be the simulator name of the second
    site ("7"); "site-1" is only a simulator name here (no site "1"), so it is the first site."""
    partition = Partition("mini", "site", 0, 3, clients={"2": ["a"], "7": ["b"]})
    assert resolve_site_name("site-2", partition) == "2"
    assert resolve_site_name("site-7", partition) == "7"
    assert resolve_site_name("site-1", partition) == "2"


# ============================================================================== initial model


def test_initial_global_state_is_the_same_on_every_call(tiny_cfg):
    from fuss_components.backbones import _architecture

    _architecture.cache_clear()  # a cold process: the first call builds timm's model
    first, second = init_global_state(tiny_cfg), init_global_state(tiny_cfg)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other_seed = init_global_state(tiny_cfg.with_overrides({"federation.seed": 1}))
    assert not torch.equal(first["centroids"], other_seed["centroids"])
    assert torch.allclose(first["centroids"].norm(dim=1), torch.ones(3))


# ============================================================================== resume


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
    assert equal_states(again.state, reference.state)
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
    assert not equal_states(again.state, reference.state)
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


# ============================================================================== unreadable images


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
    assert site.skipped_images == {"s1_003": f"cannot read image {bad_train}: cannot identify image file "
                                             f"'{bad_train}'"}
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
    # metrics.json lists each skipped file with its reason, per site
    listed = {"s1": {"s1_003": f"cannot read image {bad_train}: cannot identify image file '{bad_train}'"},
              "s3": {"s3_001": f"cannot read image {bad_val}: cannot identify image file '{bad_val}'"}}
    assert result["skipped_images"] == listed
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_images"] == listed


def test_a_bad_validation_label_stops_a_run_before_any_extraction(tmp_path, monkeypatch):
    root = make_tiny_dataset(tmp_path / "data")
    label = open_dataset("tiny", root).sample("s3_002").label_path
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(label)  # RGB: not class ids
    cfg = tiny_config(root, tmp_path / "cache")
    monkeypatch.setattr(cache_mod, "load_backbone", lambda *a, **k: pytest.fail("no backbone before the checks"))
    with pytest.raises(DataError, match=f"^label {label} must be a single-channel image of class ids, got mode RGB"):
        run_federated(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_prepare_checks_training_images_and_validation_labels_first(tmp_path):
    """A site that trains on some images and validates on others: with skip, a missing training image and a
    missing validation label are left out, listed with their reasons, and the rest is extracted."""
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 6})
    ds = open_dataset("tiny", root)
    Partition("tiny", "site", 0, 3, {"s1": ds.ids()[:4]}, {"s1": ds.ids()[4:]}).save(tmp_path / "p.json")
    image, label = ds.sample("s1_000").image_path, ds.sample("s1_005").label_path
    image.unlink()
    label.unlink()
    cfg = tiny_config(root, tmp_path / "cache", **{"partition": str(tmp_path / "p.json"), "data.on_bad_image": "skip"})
    site = Site(cfg, "s1")
    assert site.prepare(progress=False) == {"train": 3, "eval": 1, "mirror": 1}  # mirror: data.eval_flip
    assert site.skipped_images == {"s1_000": f"image file missing: {image}", "s1_005": f"label file missing: {label}"}
    with pytest.raises(DataError, match=f"^image file missing: {image} \\(data.on_bad_image='fail'"):
        Site(cfg.with_overrides({"data.on_bad_image": "fail"}), "s1").prepare(progress=False)


# ============================================================================== site partitions
def _hold_out_as_test(root: Path, ids: list[str]) -> None:
    """Move these images of the tiny dataset (and their labels) from split train to split test."""
    meta_path = root / "tiny" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for item in meta["items"]:
        if item["id"] in ids:
            for kind, ext in (("images", ".jpg"), ("labels", ".png")):
                (root / "tiny" / kind / "test" / f"{item['id']}{ext}").parent.mkdir(parents=True, exist_ok=True)
                (root / "tiny" / kind / "train" / f"{item['id']}{ext}").rename(
                    root / "tiny" / kind / "test" / f"{item['id']}{ext}")
            item["split"] = "test"
    meta_path.write_text(json.dumps(meta))


def test_site_partition_holds_out_by_site_or_by_split(tmp_path):
    root = make_tiny_dataset(tmp_path / "data")  # s1: 6 train, s2: 5 train, s3: 4 test
    _hold_out_as_test(root, ["s1_004", "s1_005"])
    ds = open_dataset("tiny", root)
    s1, s2, s3 = ds.ids(site="s1"), ds.ids(site="s2"), ds.ids(site="s3")
    # neither option: sites whose images are all in split test only validate (config partition="site")
    default = partition_sites(ds)
    assert default.clients == {"s1": s1, "s2": s2} and default.validation == {"s3": s3}
    assert resolve_partition(tiny_config(root, tmp_path / "cache")).to_dict() == default.to_dict()
    # by site: those sites only validate, every other site trains on all its images
    by_site = partition_sites(ds, validation_sites=["s2"], seed=4)
    assert by_site.clients == {"s1": s1, "s3": s3} and by_site.validation == {"s2": s2}
    assert by_site.strategy == "site" and by_site.seed == 4 and by_site.num_classes == 3
    assert by_site.meta == {"validation_only": ["s2"], "validation_split": None}
    # by split: each site's images of the split validate at that site, the rest trains there
    by_split = partition_sites(ds, validation_split="test")
    assert by_split.clients == {"s1": s1[:4], "s2": s2}
    assert by_split.validation == {"s1": ["s1_004", "s1_005"], "s3": s3}
    assert by_split.meta == {"validation_only": ["s3"], "validation_split": "test"}


def test_site_partition_errors_name_the_site_or_split_and_no_training_site_is_valid(tmp_path):
    ds = open_dataset("tiny", make_tiny_dataset(tmp_path / "data"))
    with pytest.raises(DataError, match=r"^validation site 's4' is not a site of dataset 'tiny' \(sites: \['s1', "):
        partition_sites(ds, validation_sites=["s1", "s4"])
    with pytest.raises(DataError, match=r"^validation split 'val' is not a split of dataset 'tiny' \(splits: \["):
        partition_sites(ds, validation_split="val")
    # a site whose own folder holds validation images only is a partition without a training site
    only_validation = partition_sites(ds, validation_sites=["s1", "s2", "s3"])
    assert only_validation.clients == {} and list(only_validation.validation) == ["s1", "s2", "s3"]


def test_fuss_partition_site_strategy_writes_the_manifest_and_prints_a_summary(tiny_data_root, tmp_path, capsys):
    from fuss_components.cli import main

    config = tmp_path / "config.json"
    tiny_config(tiny_data_root, tmp_path / "cache").save(config)
    out = tmp_path / "p.json"
    assert main(["partition", "--config", str(config), "--strategy", "site", "--validation-sites", "s3",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "partition of dataset 'tiny' (site): 2 training site(s) with 11 images, 1 validation site(s) with 4 images",
        "  train     s1  6 images",
        "  train     s2  5 images",
        "  validate  s3  4 images  (validation only)",
        f"wrote {out} (use it with --set partition={out})"]
    manifest = Partition.load(out)
    assert manifest.sizes() == {"s1": 6, "s2": 5} and {k: len(v) for k, v in manifest.validation.items()} == {"s3": 4}
    assert main(["partition", "--config", str(config), "--strategy", "iid", "--clients", "2",
                 "--validation-split", "test", "--out", str(tmp_path / "q.json")]) == 2
    assert "--validation-sites and --validation-split belong to --strategy site" in capsys.readouterr().err


# ============================================================================== plain image folders as sites
def test_two_image_folders_federate_as_two_sites(tmp_path):
    """Two plain folders of unlabeled images, each a site with its own data root (as FUSS_SITE_CONFIG gives a
    FLARE site), train from the same global model and aggregate; labels are never needed, and without
    train.num_clusters the unknown number of classes is an error naming the dataset."""
    from fuss_components.aggregation import ClientUpdate, aggregate
    from fuss_components.head import join_state, split_state

    from conftest import make_image_folder

    configs = {}
    for n, name in enumerate(("hospital_a", "hospital_b")):
        make_image_folder(tmp_path / name, name, seed=n)
        configs[name] = tiny_config(tmp_path / name, tmp_path / name / "cache",
                                    **{"data.dataset": name, "partition": "site"})
    sites = [Site(cfg, name) for name, cfg in configs.items()]
    assert [(s.name, s.num_samples, s.is_validation_site) for s in sites] == [("hospital_a", 4, False),
                                                                               ("hospital_b", 4, False)]
    state = init_global_state(configs["hospital_a"])
    for round_idx in range(2):
        updates = []
        for site in sites:
            result = site.train(state, round_idx)
            head, centroids = split_state(result.state)
            updates.append(ClientUpdate(site.name, head, centroids, result.num_samples, result.metrics))
        state = join_state(*aggregate(updates, configs["hospital_a"].federation, 3))
    assert torch.isfinite(state["centroids"]).all() and state["centroids"].shape == (3, 8)
    with pytest.raises(DataError, match="dataset 'hospital_a' has no labels.*train.num_clusters"):
        Site(configs["hospital_a"].with_overrides({"train.num_clusters": None}), "hospital_a")
    # a partition that asks an unlabeled folder to validate fails before any work
    Partition("hospital_a", "site", 0, 0, {"hospital_a": ["a"]}, {"hospital_a": ["sub__b"]}).save(tmp_path / "p.json")
    with pytest.raises(DataError, match="dataset 'hospital_a'.*no labels: site 'hospital_a' as a validation site"):
        Site(configs["hospital_a"].with_overrides({"partition": str(tmp_path / "p.json")}), "hospital_a")
