"""Tests of fuss_components.runner: the in-process federation (its summary, its files, determinism, checks before
any work), the pooled partition of the centralized reference, reading checkpoints, raw k-means behind a progress
bar, and the skipped images every mode lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fuss_components.config import ConfigError, FussConfig
from fuss_components.partition import Partition
from fuss_components.checkpoint import read_model_file, save_model
from fuss_components.runner import pooled_partition, run_federated
from fuss_components.site import init_global_state

from conftest import equal_states, make_tiny_dataset, tiny_config


def test_one_round_federation_summary_and_files(tiny_data_root, tmp_path):
    """s1 (6 images) and s2 (5) train, s3 (4 images) validates: one round, its record, the final scores (with one
    validation site, the summary is that site's), and the model, config and metrics written to the run folder."""
    cfg = tiny_config(tiny_data_root, tmp_path / "cache", **{"federation.rounds": 1})
    result = run_federated(cfg, tmp_path / "run", progress=False)
    assert result["mode"] == "federated"
    (record,) = result["rounds"]
    assert record["round"] == 0 and record["rejected"] == {}
    assert sorted(record["train"]) == ["s1", "s2"]
    assert record["train"]["s1"]["skipped_images"] == 0.0
    drift = record["drift"]  # both sites started from the same centroids: one round keeps them close, ids aligned
    assert 0.5 < drift["site_indexwise_mean"] <= drift["site_matched_mean"] + 1e-9 <= 1.0 + 1e-9
    assert -1.0 <= drift["site_matched_min"] <= drift["site_matched_mean"] and 0.0 < drift["fedavg_fedcc_mean"] <= 1.0
    assert sorted(record["validation"]) == ["s3"] and record["validation"]["s3"]["num_images"] == 4
    assert sorted(result["final"]) == ["s3"]
    final = result["final"]["s3"]
    assert final["num_images"] == 4 and 0.0 <= final["miou"] <= 1.0 and 0.0 <= final["pixel_acc"] <= 1.0
    assert (result["miou"], result["pixel_acc"]) == pytest.approx((final["miou"], final["pixel_acc"]))
    assert (record["miou"], record["pixel_acc"]) == pytest.approx((final["miou"], final["pixel_acc"]))  # same model
    assert result["seconds"] > 0
    state, saved, _ = read_model_file(tmp_path / "run" / "model.pt")
    assert sorted(state) == sorted(init_global_state(cfg)) and tuple(state["centroids"].shape) == (3, 8)
    assert saved == cfg.to_dict()
    assert FussConfig.load(tmp_path / "run" / "config.json") == cfg
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["mode"] == "federated" and written["miou"] == pytest.approx(result["miou"])


def test_two_runs_with_the_same_seeds_give_identical_models(tiny_data_root, tmp_path):
    """Two complete in-process federations (separate feature caches, so extraction is repeated too)."""
    models, metrics = [], []
    for i in range(2):
        cfg = tiny_config(tiny_data_root, tmp_path / f"cache{i}", **{"federation.rounds": 3})
        result = run_federated(cfg, tmp_path / f"run{i}", progress=False)
        models.append(read_model_file(tmp_path / f"run{i}" / "model.pt").state)
        metrics.append([r["miou"] for r in result["rounds"]])
    assert equal_states(models[0], models[1])
    assert metrics[0] == metrics[1]
    # control: another federation seed gives another model (so the comparison above can fail)
    cfg = tiny_config(tiny_data_root, tmp_path / "cache0", **{"federation.rounds": 3, "federation.seed": 1,
                                                                "train.seed": 1})
    run_federated(cfg, tmp_path / "other", progress=False)
    assert not equal_states(models[0], read_model_file(tmp_path / "other" / "model.pt").state)


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


def test_pooled_partition_puts_every_training_image_in_one_client():
    partition = Partition("mini", "site", 3, 4, clients={"b": ["b1"], "a": ["a1", "a2"]},
                          validation={"v": ["v1", "v2"]})
    pooled = pooled_partition(partition)
    assert pooled.clients == {"centralized": ["a1", "a2", "b1"]}  # sites in sorted order
    assert pooled.validation == {"v": ["v1", "v2"]} and pooled.validation is not partition.validation
    assert (pooled.dataset, pooled.strategy, pooled.seed, pooled.num_classes) == ("mini", "pooled", 3, 4)
    assert pooled.meta == {"pooled_from": ["a", "b"]}


def test_read_model_file_reads_our_checkpoints_and_a_bare_state(tmp_path):
    state = {"head.linear.bias": torch.arange(3.0), "centroids": torch.eye(2)}
    cfg = FussConfig.from_dict({"federation": {"rounds": 4}})
    save_model(tmp_path / "ours.pt", state, cfg, rounds=4)
    loaded, saved, _ = read_model_file(tmp_path / "ours.pt")
    assert equal_states(loaded, state) and saved == cfg.to_dict()
    assert torch.load(tmp_path / "ours.pt", weights_only=True)["rounds"] == 4
    torch.save(state, tmp_path / "FL_global_model.pt")  # a bare state dict, as FLARE's persistor may hold it
    loaded, saved, _ = read_model_file(tmp_path / "FL_global_model.pt")
    assert equal_states(loaded, state) and saved is None


def test_every_mode_runs_and_saves_without_a_validation_site(tiny_data_root, tmp_path):
    """A federation of unlabeled sites: no validation site in the partition. Federated, local-only and centralized
    training all run, write their models and report no score instead of failing after the work."""
    from fuss_components.datasets import open_dataset
    from fuss_components.runner import run_centralized, run_local

    ds = open_dataset("tiny", tiny_data_root)
    manifest = Partition("tiny", "site", 0, 3, {"s1": ds.ids(site="s1"), "s2": ds.ids(site="s2")}, {}, {}).save(
        tmp_path / "no_validation.json")
    cfg = tiny_config(tiny_data_root, tmp_path / "cache", **{"federation.rounds": 1, "partition": str(manifest)})
    for mode, run in (("federated", run_federated), ("local", run_local), ("centralized", run_centralized)):
        result = run(cfg, tmp_path / mode, progress=True)
        assert result["miou"] is None and result["pixel_acc"] is None, mode
        written = json.loads((tmp_path / mode / "metrics.json").read_text())
        assert written["miou"] is None, mode
        models = sorted((tmp_path / mode).rglob("model.pt"))
        assert len(models) == (2 if mode == "local" else 1), (mode, models)
        state, _, _ = read_model_file(models[0])
        assert tuple(state["centroids"].shape) == (3, 8)


def test_fit_kmeans_gives_sklearns_centres_one_initialisation_at_a_time(capsys):
    from sklearn.cluster import KMeans

    from fuss_components.runner import fit_kmeans

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(600, 6)).astype(np.float32)  # no clear clusters: the inits end differently
    centres = fit_kmeans(vectors, 7, 3, seed=5, progress=True)
    np.testing.assert_array_equal(centres, KMeans(7, n_init=3, random_state=5).fit(vectors).cluster_centers_)
    assert not np.array_equal(centres, KMeans(7, n_init=1, random_state=5).fit(vectors).cluster_centers_)
    assert "raw k-means (600 vectors, 7 clusters): 100%" in capsys.readouterr().err


def test_every_mode_lists_the_images_it_skipped_in_metrics_json(tmp_path, capsys):
    """data.on_bad_image=skip: a training image that cannot be read and a validation label of the wrong size are
    left out of every mode, and metrics.json lists them per site with the reason; progress bars show each mode's
    training."""
    from PIL import Image

    from fuss_components.datasets import open_dataset
    from fuss_components.runner import run_centralized, run_local, run_raw_kmeans

    root = make_tiny_dataset(tmp_path / "data")
    ds = open_dataset("tiny", root)
    image, label = ds.sample("s2_001").image_path, ds.sample("s3_000").label_path
    image.write_bytes(b"")
    Image.fromarray(np.zeros((41, 56), np.uint8)).save(label)
    cfg = tiny_config(root, tmp_path / "cache", **{"federation.rounds": 1, "data.on_bad_image": "skip"})
    bad_image = f"cannot read image {image}: cannot identify image file '{image}'"
    bad_label = (f"label {label} is 56x41 but image {ds.sample('s3_000').image_path} is 56x40 (width x height)")
    expected = {"federated": {"s2": {"s2_001": bad_image}, "s3": {"s3_000": bad_label}},
                "local": {"s2": {"s2_001": bad_image}, "s3": {"s3_000": bad_label}},
                "centralized": {"centralized": {"s2_001": bad_image}, "s3": {"s3_000": bad_label}},
                "raw-kmeans": {"centralized": {"s2_001": bad_image}, "s3": {"s3_000": bad_label}}}
    runs = {"federated": run_federated, "local": run_local, "centralized": run_centralized,
            "raw-kmeans": run_raw_kmeans}
    for mode, run in runs.items():
        result = run(cfg, tmp_path / mode, progress=True)
        written = json.loads((tmp_path / mode / "metrics.json").read_text())
        assert written["skipped_images"] == result["skipped_images"] == expected[mode], mode
        finals = result["sites"]["s1"]["validation"] if mode == "local" else result["final"]
        assert finals["s3"]["num_images"] == 3 and finals["s3"]["skipped_images"] == 1, mode
    err = capsys.readouterr().err
    for bar in ("federated training: 100%", "local training: 100%", "centralized training: 100%",
                "raw k-means (", "evaluate: 100%"):
        assert bar in err, bar


def test_commands_list_skipped_images_say_where_outputs_are_and_print_errors_on_their_own_line(tmp_path, capsys,
                                                                                              caplog):
    from fuss_components.cli import main
    from fuss_components.datasets import open_dataset

    root = make_tiny_dataset(tmp_path / "data")
    image = open_dataset("tiny", root).sample("s3_002").image_path
    image.unlink()
    cfg = tiny_config(root, tmp_path / "cache", **{"federation.rounds": 1, "data.on_bad_image": "skip"})
    config = tmp_path / "config.json"
    cfg.save(config)
    skipped = {"s3": {"s3_002": f"image file missing: {image}"}}
    with caplog.at_level("INFO", logger="fuss"):
        assert main(["extract", "--config", str(config)]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["skipped_images"] == skipped and printed["cache_dir"] == str(tmp_path / "cache")
        assert printed["extracted"] == {"s1": {"train": 6}, "s2": {"train": 5}, "s3": {"eval": 3, "mirror": 3}}
        assert caplog.records[-1].getMessage() == f"fuss extract: features in {tmp_path / 'cache'}"
        out = tmp_path / "run"
        assert main(["train", "--mode", "federated", "--config", str(config), "--out", str(out)]) == 0
        assert json.loads(capsys.readouterr().out)["skipped_images"] == skipped
        assert caplog.records[-1].getMessage() == (f"fuss train: outputs in {out}: config.json, metrics.json, "
                                                   f"model.pt, overlays/")
        assert main(["evaluate", "--model", str(out / "model.pt"), "--out", str(tmp_path / "eval")]) == 0
        assert json.loads(capsys.readouterr().out)["skipped_images"] == skipped
        assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["skipped_images"] == skipped
        assert caplog.records[-1].getMessage().startswith(f"fuss evaluate: outputs in {tmp_path / 'eval'}: ")
    # an image whose header reads but whose data does not stops the extraction in the middle of its progress bar:
    # the error comes after the closed bar, on its own line
    truncated = open_dataset("tiny", root).sample("s1_003").image_path
    truncated.write_bytes(truncated.read_bytes()[:-300])
    fresh = tmp_path / "config_fail.json"
    tiny_config(root, tmp_path / "cache2").save(fresh)
    capsys.readouterr()
    assert main(["extract", "--config", str(fresh), "--sites", "s1"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.splitlines()[-1].startswith(f"fuss: error: cannot read image {truncated}: ")
    assert "extract train s1:  50%" in err.splitlines()[-2]
    # likewise a label that fails while evaluation iterates (its bar is closed before the error is printed)
    label = open_dataset("tiny", root).sample("s3_001").label_path
    label.write_bytes(label.read_bytes()[:-40])
    assert main(["evaluate", "--model", str(out / "model.pt"), "--out", str(tmp_path / "eval2")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"fuss: error: cannot read label {label}: ")
    assert err.splitlines()[-2].startswith("evaluate:  33%")
