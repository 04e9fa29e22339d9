"""The `fuss` command line on the tiny dataset, and one short real-data federation."""

import json

import numpy as np
import pytest
from PIL import Image

from fuss_components.cli import main
from fuss_components.config import FussConfig
from fuss_components.partition import Partition

from conftest import tiny_config


def _config_file(cfg, tmp_path):
    path = tmp_path / "config.json"
    cfg.save(path)
    return str(path)


def test_train_then_evaluate_reproduces_metrics(tiny_data_root, tmp_path, capsys):
    cfg = _config_file(tiny_config(tiny_data_root, tmp_path / "cache"), tmp_path)
    out = tmp_path / "fed"
    assert main(["train", "--mode", "federated", "--config", cfg, "--out", str(out),
                 "--set", "federation.aggregator=fedcc-maximin"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    saved = FussConfig.load(out / "config.json")
    assert saved.federation.aggregator == "fedcc-maximin"
    assert len(metrics["rounds"]) == 2 and set(metrics["rounds"][0]["train"]) == {"s1", "s2"}
    assert 0 <= metrics["miou"] <= 1 and list(metrics["final"]) == ["s3"]
    assert any((out / "overlays" / "s3").glob("*.png"))
    capsys.readouterr()
    # evaluating the saved model (its config travels inside the checkpoint) gives the same numbers
    assert main(["evaluate", "--model", str(out / "model.pt"), "--out", str(tmp_path / "eval"), "--crf"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["miou"] == pytest.approx(metrics["miou"], abs=1e-9)
    assert 0 <= printed["crf"]["miou"] <= 1


def test_local_and_centralized_modes(tiny_data_root, tmp_path):
    cfg = _config_file(tiny_config(tiny_data_root, tmp_path / "cache"), tmp_path)
    assert main(["train", "--mode", "local", "--config", cfg, "--out", str(tmp_path / "local")]) == 0
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())
    assert set(local["sites"]) == {"s1", "s2"}
    assert local["miou_worst"] <= local["miou"] <= local["miou_best"]
    assert main(["train", "--mode", "centralized", "--config", cfg, "--out", str(tmp_path / "central")]) == 0
    central = json.loads((tmp_path / "central" / "metrics.json").read_text())
    assert central["rounds"][0]["train"]["steps"] == 3


def test_partition_manifest_drives_training(tiny_data_root, tmp_path):
    cfg = tiny_config(tiny_data_root, tmp_path / "cache")
    manifest = tmp_path / "iid.json"
    assert main(["partition", "--config", _config_file(cfg, tmp_path), "--strategy", "iid", "--clients", "3",
                 "--out", str(manifest)]) == 0
    partition = Partition.load(manifest)
    assert sorted(len(v) for v in partition.clients.values()) == [5, 5, 5]
    partition.validation = {"s3": [i for i in sum(partition.clients.values(), []) if i.startswith("s3")]}
    partition.save(manifest)
    cfg = cfg.with_overrides({"partition": str(manifest), "federation.rounds": 1})
    assert main(["train", "--mode", "federated", "--config", _config_file(cfg, tmp_path), "--out",
                 str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["rounds"][0]["train"]) == set(partition.clients)


def test_predict_writes_masks(tiny_data_root, tmp_path):
    cfg = _config_file(tiny_config(tiny_data_root, tmp_path / "cache"), tmp_path)
    assert main(["train", "--mode", "centralized", "--config", cfg, "--out", str(tmp_path / "run")]) == 0
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((30, 50, 3), 128, np.uint8)).save(images / "a.png")
    assert main(["predict", "--model", str(tmp_path / "run" / "model.pt"), "--images", str(images),
                 "--out", str(tmp_path / "pred")]) == 0
    mask = np.asarray(Image.open(tmp_path / "pred" / "masks" / "a.png"))
    assert mask.shape == (30, 50) and mask.max() < 3


def test_bad_config_fails_before_work(tmp_path, capsys):
    assert main(["train", "--mode", "local", "--set", "train.lr_hed=1", "--out", str(tmp_path / "x")]) == 2
    assert "train.lr_hed" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


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


@pytest.mark.realdata
def test_short_real_federation(shared, tmp_path):
    """Two camvid sequences x 6 images, 2 rounds, real backbone; validation on 4 Seq05VD frames."""
    from fuss_components.datasets import open_dataset

    ds = open_dataset("camvid", shared / "data")
    clients = {s: ds.ids(site=s)[::20][:6] for s in ("0001TP", "0016E5")}
    Partition("camvid", "site", 0, 11, clients, {"Seq05VD": ds.ids(site="Seq05VD")[::40][:4]}, {}).save(
        tmp_path / "p.json")
    cfg = FussConfig.from_dict({"partition": str(tmp_path / "p.json"), "cache_dir": str(tmp_path / "cache"),
                                "federation": {"rounds": 2, "local_steps": 4}})
    assert main(["train", "--mode", "federated", "--config", _config_file(cfg, tmp_path), "--out",
                 str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    final = metrics["final"]["Seq05VD"]
    assert 0.05 < final["miou"] < 1 and final["num_images"] == 4
    assert final["clusters_used"] >= 3
    assert all(np.isfinite(v) for v in metrics["rounds"][-1]["train"]["0001TP"].values())


def test_extract_builds_every_site_once(tiny_data_root, tmp_path, caplog):
    cfg = _config_file(tiny_config(tiny_data_root, tmp_path / "cache"), tmp_path)
    assert main(["extract", "--config", cfg]) == 0
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*.npy"))
    assert len(files) == 6 + 5 + 2 * 4  # s1, s2 training views; s3 evaluation views, and mirrored (eval_flip)
    caplog.clear()
    with caplog.at_level("INFO", logger="fuss"):
        assert main(["extract", "--config", cfg]) == 0
    assert "{'train': 0}" in caplog.text and "{'eval': 0, 'mirror': 0}" in caplog.text


# ============================================================================== a plain folder of unlabeled images
def test_plain_image_folder_extract_train_predict(tmp_path, capsys):
    """A folder without meta.json (nested PNG / JPEG / TIFF / DICOM, one unreadable DICOM skipped) is one
    unlabeled site: extract, a one-site federation (no validation: mIoU None, model saved), a site partition and
    prediction work; evaluation and a Dirichlet partition fail naming the dataset."""
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "data", "scans")
    (folder / "ct" / "broken.dcm").write_bytes(b"not a dicom")
    cfg = tiny_config(tmp_path / "data", tmp_path / "cache", **{"data.dataset": "scans", "partition": "site",
                                                                "data.on_bad_image": "skip"})
    config = _config_file(cfg, tmp_path)
    assert main(["extract", "--config", config]) == 0
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4  # the broken file is skipped
    assert main(["partition", "--config", config, "--out", str(tmp_path / "p.json")]) == 0
    partition = Partition.load(tmp_path / "p.json")
    assert partition.clients == {"scans": ["a", "ct__broken", "ct__d", "sub__b", "sub__deeper__c"]}
    assert partition.validation == {} and partition.num_classes == 0
    capsys.readouterr()
    out = tmp_path / "fed"
    assert main(["train", "--mode", "federated", "--config", config, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["miou"] is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["miou"] is None and metrics["final"] == {} and len(metrics["rounds"]) == 2
    assert metrics["rounds"][-1]["train"]["scans"]["skipped_images"] == 1.0
    assert (out / "model.pt").is_file()

    assert main(["predict", "--model", str(out / "model.pt"), "--images", str(folder), "--out",
                 str(tmp_path / "pred"), "--set", "data.on_bad_image=skip"]) == 0
    masks = sorted(p.name for p in (tmp_path / "pred" / "masks").iterdir())
    assert masks == ["a.png", "ct__d.png", "sub__b.png", "sub__deeper__c.png"]
    mask = np.asarray(Image.open(tmp_path / "pred" / "masks" / "ct__d.png"))
    assert mask.shape == (40, 56) and mask.max() < 3

    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "model.pt"), "--out", str(tmp_path / "eval")]) == 2
    assert "dataset 'scans'" in capsys.readouterr().err
    assert main(["partition", "--config", config, "--strategy", "dirichlet", "--clients", "2",
                 "--out", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err
    assert "dataset 'scans'" in err and "no labels" in err and not (tmp_path / "d.json").exists()
