"""Cluster names in model files (`fuss name-clusters`), the area table, and the readable outputs of `fuss predict`:
overlays with a legend, areas.csv, predict.json and skipped images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fuss_components.cli import main
from fuss_components.checkpoint import read_model_file
from fuss_components.names import ClusterNamesError, area_columns, area_row, name_clusters, read_names_json
from fuss_components.checkpoint import read_model_file, save_model
from fuss_components.site import init_global_state
from fuss_components.viz import overlay_with_legend

from conftest import equal_states, tiny_config

DEFAULT_NAMES = ["cluster 0", "cluster 1", "cluster 2"]


def _json(tmp_path, data, name="names.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def tiny_model(tmp_path):
    """A fuss_model.pt-style checkpoint of the tiny config (3 clusters, untrained), with one extra key."""
    cfg = tiny_config(tmp_path / "data", tmp_path / "cache")
    state = init_global_state(cfg, 3)
    return save_model(tmp_path / "model.pt", state, cfg, round=7), state, cfg


def test_names_json_list_dict_and_errors_naming_the_file(tmp_path):
    assert read_names_json(_json(tmp_path, ["bg", "polyp", " tool "]), DEFAULT_NAMES) == ["bg", "polyp", "tool"]
    current = ["bg", "cluster 1", "cluster 2"]
    assert read_names_json(_json(tmp_path, {"2": "tool"}), current) == ["bg", "cluster 1", "tool"]
    bad = {
        "lists 2 names but the model has 3 clusters": ["a", "b"],
        "cluster id 3 is out of range": {"3": "x"},
        "cluster id -1 is out of range": {"-1": "x"},
        "key 'one' is not a cluster id": {"one": "x"},
        "name of cluster 1 must be a non-empty one-line string": {"1": 5},
        "name of cluster 0 must be a non-empty one-line string, got ' '": [" ", "b", "c"],
        "must hold a list of 3 names": "bg",
    }
    for message, data in bad.items():
        path = _json(tmp_path, data, "bad.json")
        with pytest.raises(ClusterNamesError, match=message) as err:
            read_names_json(path, DEFAULT_NAMES)
        assert str(path) in str(err.value)
    (tmp_path / "broken.json").write_text("[\"a\",")
    with pytest.raises(ClusterNamesError, match="cannot read cluster names file .*broken.json"):
        read_names_json(tmp_path / "broken.json", DEFAULT_NAMES)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_names_json(tmp_path / "missing.json", DEFAULT_NAMES)


def test_name_clusters_checkpoint_in_place_keeps_other_keys(tiny_model, tmp_path):
    path, state, cfg = tiny_model
    assert name_clusters(path, _json(tmp_path, {"1": "red"})) == ["cluster 0", "red", "cluster 2"]
    # a second, partial naming keeps the names given before
    assert name_clusters(path, _json(tmp_path, {"2": "blue"})) == ["cluster 0", "red", "blue"]
    blob = torch.load(path, weights_only=True)
    assert blob["round"] == 7 and blob["cluster_names"] == ["cluster 0", "red", "blue"]
    loaded, config, _ = read_model_file(path)
    assert equal_states(loaded, state) and config == cfg.to_dict()
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic writer left nothing behind


def test_name_clusters_bare_state_to_new_file(tiny_model, tmp_path):
    _, state, _ = tiny_model
    bare = tmp_path / "FL_global_model.pt"
    torch.save(state, bare)
    out = tmp_path / "named.pt"
    name_clusters(bare, _json(tmp_path, ["bg", "red", "blue"]), out)
    assert equal_states(torch.load(bare, weights_only=True), state)  # the source is untouched
    blob = torch.load(out, weights_only=True)
    assert set(blob) == {"model", "config", "cluster_names"} and blob["config"] is None
    loaded, config, _ = read_model_file(out)
    assert equal_states(loaded, state) and config is None
    assert read_model_file(out)[2] == ["bg", "red", "blue"]


def test_name_clusters_command(tiny_model, tmp_path, capsys):
    path, _, _ = tiny_model
    out = tmp_path / "named.pt"
    assert main(["name-clusters", "--model", str(path), "--names", str(_json(tmp_path, ["a", "b", "c"])),
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"model": str(out), "cluster_names": ["a", "b", "c"]}
    assert read_model_file(out)[2] == ["a", "b", "c"] and read_model_file(path)[2] is None
    before = path.read_bytes()
    assert main(["name-clusters", "--model", str(path), "--names", str(_json(tmp_path, {"5": "x"}))]) == 2
    err = capsys.readouterr().err
    assert "names.json" in err and "cluster id 5 is out of range" in err
    assert path.read_bytes() == before
    assert main(["name-clusters", "--model", str(tmp_path / "nope.pt"), "--names", "x.json"]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_area_columns_and_rows():
    assert area_columns(["bg", "polyp", "bg"]) == [
        "image_id", "width", "height", "bg (cluster 0)", "polyp", "bg (cluster 2)",
        "bg (cluster 0) pixels", "polyp pixels", "bg (cluster 2) pixels"]
    mask = np.array([[0, 0, 2, 2], [0, 0, 0, 2]])  # 2 high, 4 wide: 5 pixels of 0, none of 1, 3 of 2
    assert area_row("x", mask, 3) == ["x", 4, 2, 0.625, 0.0, 0.375, 5, 0, 3]
    with pytest.raises(ValueError, match="cluster id 3 >= 3"):
        area_row("x", mask + 1, 3)


def test_predict_writes_legend_overlays_areas_and_summary(tiny_model, tmp_path, capsys):
    path, _, _ = tiny_model
    name_clusters(path, _json(tmp_path, ["background", "red thing", "blue thing"]))
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pictures = {"a": rng.integers(0, 256, (30, 50, 3), dtype=np.uint8),
                "sub__b": rng.integers(0, 256, (42, 28, 3), dtype=np.uint8)}
    Image.fromarray(pictures["a"]).save(images / "a.png")
    Image.fromarray(pictures["sub__b"]).save(images / "sub" / "b.png")
    (images / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "pred"

    assert main(["predict", "--model", str(path), "--images", str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err  # on_bad_image=fail (the default) stops, naming the file and the way out
    assert "bad.png" in err and "data.on_bad_image=skip" in err

    assert main(["predict", "--model", str(path), "--images", str(images), "--out", str(out),
                 "--set", "data.on_bad_image=skip"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "2 images segmented, 1 skipped" in last and str(out) in last
    summary = json.loads((out / "predict.json").read_text())
    assert summary["written"] == 2 and summary["cluster_names"] == ["background", "red thing", "blue thing"]
    assert [(s["image_id"], s["path"]) for s in summary["skipped"]] == [("bad", "bad.png")]
    assert "bad.png" in summary["skipped"][0]["reason"]
    assert summary["outputs"]["areas"] == "areas.csv"

    with open(out / "areas.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["image_id", "width", "height", "background", "red thing", "blue thing",
                       "background pixels", "red thing pixels", "blue thing pixels"]
    assert [r[0] for r in rows[1:]] == ["a", "sub__b"]
    for row in rows[1:]:
        image_id = row[0]
        mask = np.asarray(Image.open(out / "masks" / f"{image_id}.png")).astype(np.int64)
        height, width = pictures[image_id].shape[:2]
        assert mask.shape == (height, width) and row[1:3] == [str(width), str(height)]
        counts = np.bincount(mask.ravel(), minlength=3)
        assert [int(v) for v in row[6:]] == counts.tolist()
        np.testing.assert_allclose([float(v) for v in row[3:6]], counts / mask.size, atol=5e-7)
        written = np.asarray(Image.open(out / "overlays" / f"{image_id}.png").convert("RGB"))
        expected = overlay_with_legend(pictures[image_id], mask, summary["cluster_names"])
        np.testing.assert_array_equal(written, expected)
        assert written.shape[1] > width  # the legend sits beside the overlay
