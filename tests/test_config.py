"""FussConfig: spec defaults, strict parsing (unknown keys, types, impossible values), overrides, round trip."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from fuss_components.config import (
    CHOICES,
    REFERENCE_COMMAND,
    BackboneConfig,
    ConfigError,
    DataConfig,
    FederationConfig,
    FussConfig,
    LossConfig,
    TrainConfig,
    _dotted_keys,
    _sections,
    did_you_mean,
    field_comments,
    parse_override,
    parse_overrides,
    render_reference,
)

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_defaults_match_spec():
    cfg = FussConfig()
    assert cfg.train.lr_head == 5e-4
    assert cfg.train.lr_centroids == 5e-3
    assert cfg.train.batch_size == 8
    assert cfg.train.dim == 70
    assert cfg.train.knn == 7
    assert cfg.train.num_random == 5
    assert cfg.loss.grid == 11
    # STEGO's Cityscapes weights / shifts of the three correspondence terms
    assert (cfg.loss.random_weight, cfg.loss.random_shift) == (0.9059, 0.3136)
    assert (cfg.loss.knn_weight, cfg.loss.knn_shift) == (0.5775, 0.1754)
    assert (cfg.loss.self_weight, cfg.loss.self_shift) == (1.0, 0.4583)
    assert cfg.federation.aggregator == "fedcc-kmeans"
    assert cfg.backbone.name == "vit_small_patch14_dinov2"
    # an empty dict gives the same defaults, and they validate
    assert FussConfig.from_dict({}) == cfg
    assert FussConfig.from_dict(None) == cfg


def test_sections_are_the_documented_types():
    cfg = FussConfig()
    assert isinstance(cfg.backbone, BackboneConfig)
    assert isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.loss, LossConfig)
    assert isinstance(cfg.train, TrainConfig)
    assert isinstance(cfg.federation, FederationConfig)


def test_from_dict_sets_nested_values():
    cfg = FussConfig.from_dict({"train": {"lr_head": 1e-3, "num_clusters": 27},
                                "federation": {"aggregator": "fedavg", "local_steps": 5},
                                "partition": "site"})
    assert cfg.train.lr_head == 1e-3
    assert cfg.train.num_clusters == 27
    assert cfg.train.batch_size == 8  # untouched fields keep their defaults
    assert cfg.federation.aggregator == "fedavg"
    assert cfg.federation.local_steps == 5
    assert cfg.partition == "site"


@pytest.mark.parametrize("data, key", [
    ({"bogus": 1}, "bogus"),
    ({"train": {"lr_hed": 1e-3}}, "train.lr_hed"),
    ({"loss": {"grid": 5, "gird": 5}}, "loss.gird"),
    ({"federation": {"aggregatr": "fedavg"}}, "federation.aggregatr"),
])
def test_unknown_key_names_dotted_key(data, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        FussConfig.from_dict(data)


@pytest.mark.parametrize("data, key", [
    ({"train": {"batch_size": "8"}}, "train.batch_size"),
    ({"train": {"lr_head": "fast"}}, "train.lr_head"),
    ({"train": {"batch_size": 8.0}}, "train.batch_size"),
    ({"data": {"dataset": 3}}, "data.dataset"),
    ({"federation": {"weighted": "yes"}}, "federation.weighted"),
    ({"backbone": {"block": None}}, "backbone.block"),
    ({"partition": ["a"]}, "partition"),
])
def test_wrong_type_names_key(data, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        FussConfig.from_dict(data)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="'train'"):
        FussConfig.from_dict({"train": 3})


@pytest.mark.parametrize("data, key", [
    ({"train": {"lr_head": -1e-4}}, "train.lr_head"),
    ({"train": {"lr_centroids": 0.0}}, "train.lr_centroids"),
    ({"train": {"num_clusters": 0}}, "train.num_clusters"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"dropout": 1.0}}, "train.dropout"),
    ({"federation": {"aggregator": "fedmedian"}}, "federation.aggregator"),
    ({"federation": {"rounds": 0}}, "federation.rounds"),
    ({"data": {"crop_ratio": 0}}, "data.crop_ratio"),
    ({"data": {"crop_ratio": 1.5}}, "data.crop_ratio"),
    ({"data": {"train_size": -224}}, "data.train_size"),
    ({"loss": {"shift_mode": "learned"}}, "loss.shift_mode"),
    ({"loss": {"knn_attract": 1.0}}, "loss.knn_attract"),
    ({"loss": {"grid": 0}}, "loss.grid"),
    ({"backbone": {"sha256": "abc"}}, "backbone.sha256"),
])
def test_impossible_values_name_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        FussConfig.from_dict(data)


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


def test_int_accepted_for_float_bool_not_for_int():
    cfg = FussConfig.from_dict({"train": {"lr_head": 1, "dropout": 0}, "data": {"crop_ratio": 1}})
    assert cfg.train.lr_head == 1.0 and type(cfg.train.lr_head) is float
    assert type(cfg.train.dropout) is float and type(cfg.data.crop_ratio) is float
    with pytest.raises(ConfigError, match="'train.batch_size'"):
        FussConfig.from_dict({"train": {"batch_size": True}})
    with pytest.raises(ConfigError, match="'train.lr_head'"):
        FussConfig.from_dict({"train": {"lr_head": True}})
    with pytest.raises(ConfigError, match="'train.num_clusters'"):  # int | None: bool still rejected
        FussConfig.from_dict({"train": {"num_clusters": False}})


def test_optional_fields_accept_null():
    cfg = FussConfig.from_dict({"train": {"num_clusters": None}, "federation": {"local_steps": None}})
    assert cfg.train.num_clusters is None and cfg.federation.local_steps is None


def test_with_overrides_applies_dotted_keys_and_copies():
    base = FussConfig()
    new = base.with_overrides({"train.lr_head": 1e-4, "federation.rounds": 3, "partition": "iid"})
    assert new.train.lr_head == 1e-4 and new.federation.rounds == 3 and new.partition == "iid"
    assert base.train.lr_head == 5e-4 and base.federation.rounds == 10 and base.partition == "camvid"


@pytest.mark.parametrize("key", ["train.nope", "nosection.lr", "bogus", "train.lr_head.x"])
def test_with_overrides_unknown_key_errors(key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        FussConfig().with_overrides({key: 1})


def test_with_overrides_validates():
    with pytest.raises(ConfigError, match=r"train\.lr_head"):
        FussConfig().with_overrides({"train.lr_head": -1.0})
    with pytest.raises(ConfigError, match="'train.batch_size'"):
        FussConfig().with_overrides({"train.batch_size": "eight"})


def test_set_items_parse_as_json_else_as_bare_strings():
    assert parse_override("federation.rounds=3") == ("federation.rounds", 3)
    assert parse_override("federation.weighted=false") == ("federation.weighted", False)
    assert parse_override("federation.min_clients=null") == ("federation.min_clients", None)
    assert parse_override("data.dataset=polyp") == ("data.dataset", "polyp")  # no quotes needed
    assert parse_override("data.root=/a=b") == ("data.root", "/a=b")  # only the first "=" splits
    assert parse_overrides(["train.lr_head=1e-4", "federation.rounds=2", "federation.rounds=5"]) == \
        {"train.lr_head": 1e-4, "federation.rounds": 5}  # a later item wins
    assert parse_overrides(None) == {}
    for bad in ("federation.rounds", "=3"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_override(bad)


def test_save_load_round_trip(tmp_path):
    cfg = FussConfig.from_dict({
        "backbone": {"block": -1, "weights": "/x/w.safetensors", "sha256": "a" * 64},
        "data": {"dataset": "polyp", "crop_ratio": 0.75},
        "train": {"num_clusters": 5, "lr_head": 2e-4, "fedprox_mu": 0.001},
        "loss": {"shift_mode": "fixed", "pointwise": False},
        "federation": {"aggregator": "fedcc-maximin", "weighted": False, "local_steps": 7},
        "partition": "polyp", "cache_dir": "/tmp/c",
    })
    path = tmp_path / "sub" / "cfg.json"
    cfg.save(path)
    assert json.loads(path.read_text())["train"]["lr_head"] == 2e-4
    loaded = FussConfig.load(path)
    assert loaded == cfg
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.backbone.sha256 == "a" * 64 and loaded.federation.local_steps == 7


def test_load_rejects_bad_files(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="nope.json"):
        FussConfig.load(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        FussConfig.load(broken)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"train": {"lr": 1}}))
    with pytest.raises(ConfigError, match="'train.lr'"):
        FussConfig.load(unknown)


# ---------------------------------------------------------------------------- settings the objective ignores

@pytest.mark.parametrize("objective, key, value", [
    ("smooseg", "train.lr_head", 1e-3),
    ("smooseg", "train.lr_centroids", 1e-2),
    ("smooseg", "train.centroid_lambda", 0.5),
    ("smooseg", "train.reseed_dead_every", 0),
    ("smooseg", "train.num_random", 2),
    ("smooseg", "loss.grid", 5),
    ("primaps", "loss.pointwise", False),
    ("primaps", "train.centroid_lambda", 0.5),
    ("primaps", "train.reseed_dead_every", 10),
    ("primaps", "loss.shift_mode", "fixed"),
    ("ppap", "train.lr_head", 1e-3),
    ("ppap", "train.lr_centroids", 1e-2),
    ("ppap", "loss.self_weight", 0.5),
    ("ppap", "loss.pointwise", False),
])
def test_setting_ignored_by_the_objective_names_the_key(objective, key, value):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}=.*no effect.*'{objective}'"):
        FussConfig().with_overrides({"train.objective": objective, key: value})
    section, name = key.split(".")
    data = {"train": {"objective": objective}}
    data.setdefault(section, {})[name] = value
    with pytest.raises(ConfigError, match=key.replace(".", "[.]")):  # the same through from_dict / load
        FussConfig.from_dict(data)
    FussConfig().with_overrides({key: value})  # stego reads every one of them


@pytest.mark.parametrize("objective, key, value", [
    ("ppap", "train.centroid_lambda", 0.5),  # ppap trains its centroids with stego's centroid loss
    ("ppap", "train.reseed_dead_every", 0),
    ("smooseg", "loss.pointwise", False),  # smooseg's closeness uses the same centering
    ("smooseg", "train.smooseg.lr_head", 1e-3),  # an objective's own section
    ("primaps", "train.primaps.lr_prototypes", 1e-2),
    ("ppap", "train.ppap.lr_head", 1e-4),
    ("primaps", "train.fedprox_mu", 0.01),  # shared by every objective
    ("smooseg", "train.dim", 16),
])
def test_settings_the_objective_reads_are_accepted(objective, key, value):
    node = FussConfig().with_overrides({"train.objective": objective, key: value}).to_dict()
    for part in key.split("."):
        node = node[part]
    assert node == value


@pytest.mark.parametrize("objective", ["smooseg", "primaps", "ppap"])
def test_every_objective_accepts_the_defaults_and_a_round_trip(objective, tmp_path):
    cfg = FussConfig.from_dict({"train": {"objective": objective}})
    cfg.save(tmp_path / "cfg.json")  # every key written out, stego's at their defaults
    assert FussConfig.load(tmp_path / "cfg.json") == cfg


# ---------------------------------------------------------------------------- checks that need the partition

@pytest.mark.parametrize("aggregator", ["fedcc-kmeans", "fedcc-maximin", "fedavg"])
def test_partition_without_training_site_is_rejected(aggregator):
    cfg = FussConfig.from_dict({"federation": {"aggregator": aggregator}, "partition": "mine.json"})
    with pytest.raises(ConfigError, match="partition 'mine.json' has no training site"):
        cfg.check_sites(0)
    assert cfg.check_sites(1) is cfg


def test_min_clients_beyond_the_training_sites_is_rejected():
    cfg = FussConfig.from_dict({"federation": {"min_clients": 3}})
    with pytest.raises(ConfigError, match=r"federation\.min_clients=3 exceeds the 2 training site"):
        cfg.check_sites(2)
    cfg.check_sites(3)


@pytest.mark.parametrize("key,suggestion", [
    ("federation.robustness", "'federation.robust'"),
    ("train.lr_hed", "'train.lr_head'"),
])
def test_unknown_key_names_the_closest_known_keys(key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'; did you mean .*{suggestion}"):
        FussConfig().with_overrides({key: 1})
    section, _, leaf = key.partition(".")
    with pytest.raises(ConfigError, match=f"did you mean .*{suggestion}"):
        FussConfig.from_dict({section: {leaf: 1}})


def test_did_you_mean_names_up_to_three_close_keys_or_none():
    assert did_you_mean("lr_hed", ["lr_head", "lr_centroids", "dim"]) == "did you mean 'lr_head'?"
    assert did_you_mean("spilt", ["split", "site", "id"]) == "did you mean 'split' or 'site'?"
    assert did_you_mean("colour", ["split", "site", "id"]) is None


# ---------------------------------------------------------------------------- the reference, docs/config.md

def test_field_comments_join_the_lines_above_a_field_and_its_own_comment():
    comments = field_comments(FederationConfig)
    assert comments["kmeans_n_init"] == 'k-means restarts of "fedcc-kmeans" on the server'
    assert comments["trim_fraction"] == ('robust "trimmed-mean": share of the clients cut at EACH end per coordinate '
                                         '(rounded up, at most (n - 1) // 2)')
    assert comments["robust"].startswith('Robust aggregation of the head (fuss_components.aggregation): "none" = ')
    assert field_comments(BackboneConfig)["weights"] == (
        'Local .safetensors/.pth file, or "timm" to use timm\'s pretrained tag of `name`. None: '
        '$FUSS_BACKBONE_WEIGHTS, else the shared DINOv2 ViT-S/14 file (see docs/assets caveat).')


def test_every_key_has_a_description_and_a_row_with_its_default():
    reference = render_reference()
    rows = [line.split("`")[1] for line in reference.splitlines() if line.startswith("| `")]
    assert sorted(rows) == sorted(_dotted_keys(FussConfig().to_dict())) and len(rows) == 96
    for prefix, cls in _sections(FussConfig):
        comments, hints = field_comments(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(hints[f.name]):
                assert comments[f.name], f"{prefix}{f.name} has no comment in config.py"
    assert '| `federation.rounds` | int | `10` | federated rounds (each: local training at every training site, ' \
           'then aggregation) |' in reference
    assert "| `train.num_clusters` | int or null | `null` | \\|C\\|; None = number of classes of the dataset |" \
        in reference
    assert 'One of "fail", "skip". |' in reference and set(CHOICES) <= {
        f"{p}{f.name}" for p, c in _sections(FussConfig) for f in dataclasses.fields(c)}


def test_committed_reference_is_the_rendered_one():
    assert REFERENCE.read_text() == render_reference(), f"docs/config.md is stale: run {REFERENCE_COMMAND}"


def test_reference_command_prints_the_reference():
    printed = subprocess.run([sys.executable, "-m", "fuss_components.config", "--markdown"], capture_output=True,
                             text=True, check=True).stdout
    assert printed == render_reference()
