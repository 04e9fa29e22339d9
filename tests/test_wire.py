"""The schema of what may leave a site (fuss_components.wire): pure checks, no FLARE."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fuss_components import wire
from fuss_components.views import TrainFeatures
from fuss_components.config import FussConfig
from fuss_components.site import build_model, init_global_state
from fuss_components.trainer import LocalTrainer

TINY_BACKBONE = {"name": "fuss_tiny_vit_patch14", "weights": "random", "block": -1}


def tiny_model_config(**train) -> FussConfig:
    return FussConfig.from_dict({"backbone": TINY_BACKBONE, "data": {"dataset": "tiny", "train_size": 28},
                                 "train": {"dim": 8, "num_clusters": 3, "device": "cpu", **train},
                                 "federation": {"local_steps": 2}, "partition": "site"})


@pytest.fixture(scope="module")
def shapes():
    return wire.expected_state_shapes(tiny_model_config())


@pytest.fixture
def honest_state():
    return init_global_state(tiny_model_config())


# ---------------------------------------------------------------------------------------------- the lists


@pytest.mark.parametrize("objective", ["stego", "smooseg", "primaps", "ppap"])
def test_train_metrics_list_every_key_a_trainer_reports(objective):
    """Two rounds of two steps on synthetic features, FedProx and MOON on: every metric key is in the list."""
    torch.manual_seed(0)
    feats = torch.randn(20, 32, 4, 4).half()
    knn = torch.stack([torch.tensor([(i + 1) % 20, (i + 2) % 20]) for i in range(20)])
    extra = {"num_random": 2, "batch_size": 4} if objective == "stego" else {}
    cfg = tiny_model_config(objective=objective, fedprox_mu=0.01, moon_weight=1.0, **extra)
    trainer = LocalTrainer(TrainFeatures(feats, [f"i{n // 5}" for n in range(20)], knn), cfg, "s1", 3)
    state = init_global_state(cfg)
    reported = set()
    for round_idx in range(2):
        result = trainer.train(state, round_idx)
        state = result.state
        reported |= set(result.metrics)
    reported.add("skipped_images")  # added by Site.train
    assert {"loss_fedprox", "loss_moon", "steps", "clusters_used"} <= reported
    assert reported <= set(wire.TRAIN_METRICS), reported - set(wire.TRAIN_METRICS)


def test_analytics_tags_are_the_train_metrics_and_three_validation_scalars():
    assert set(wire.ANALYTICS_TAGS) == {f"train/{m}" for m in wire.TRAIN_METRICS} | {
        "val/miou", "val/pixel_acc", "val/clusters_used"}


# ---------------------------------------------------------------------------------------------- parameters


def test_expected_shapes_are_the_models_and_cost_no_memory(shapes):
    cfg = tiny_model_config()
    assert shapes == {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    assert shapes["centroids"] == (3, 8) and shapes["head.linear.weight"] == (8, 32, 1, 1)
    huge = wire.expected_state_shapes(tiny_model_config(dim=10**9))  # on the meta device: nothing allocated
    assert wire.count_parameters(huge) > 10**10
    with pytest.raises(ValueError, match="number of clusters"):
        wire.expected_state_shapes(FussConfig.from_dict({"backbone": TINY_BACKBONE, "train": {"dim": 8}}))


def test_honest_state_passes_as_fresh_copies(shapes, honest_state):
    kept, dropped = wire.check_state(honest_state, shapes)
    assert dropped == [] and set(kept) == set(shapes)
    for name, value in honest_state.items():
        assert torch.equal(kept[name], value) and kept[name].data_ptr() != value.data_ptr()
    as_numpy = {k: v.numpy() for k, v in honest_state.items()}
    kept, dropped = wire.check_state(as_numpy, shapes)
    assert dropped == [] and all(isinstance(v, np.ndarray) and v is not as_numpy[k] for k, v in kept.items())
    half = {k: v.to(torch.bfloat16) for k, v in honest_state.items()}
    assert wire.check_state(half, shapes)[1] == []


def test_a_view_of_a_larger_storage_leaves_alone(shapes, honest_state):
    """A parameter that is a view into a storage holding other bytes travels as its own values only."""
    secret = torch.arange(10_000, dtype=torch.float32)
    state = dict(honest_state, **{"head.linear.bias": secret[:8]})
    kept, _ = wire.check_state(state, shapes)
    assert kept["head.linear.bias"].untyped_storage().nbytes() == 8 * 4


def test_state_leaks_are_dropped_with_reasons(shapes, honest_state):
    jpeg = bytes([0xFF, 0xD8, 0xFF, 0xE0]) + bytes(4092)
    state = dict(honest_state)
    state["head.linear.weight"] = jpeg  # raw bytes under a real parameter name
    state["head.linear.bias"] = torch.frombuffer(bytearray(jpeg[:8]), dtype=torch.uint8)  # uint8 tensor
    state["head.nonlinear.0.bias"] = torch.zeros(32, dtype=torch.int64)
    state["head.extra"] = torch.zeros(8)  # under head.*, not a parameter of the head
    state["head.nonlinear.2.weight"] = torch.zeros(4096)  # wrong shape
    state["labels"] = np.zeros((40, 56), np.uint8)
    state["/data/site/images/img_000.jpg"] = "a path"
    kept, dropped = wire.check_state(state, shapes)
    reasons = dict(dropped)
    assert set(kept) == {"head.nonlinear.0.weight", "head.nonlinear.2.bias", "centroids"}
    assert reasons["head.linear.weight"] == "a bytes, not a tensor"
    assert "not a floating dtype" in reasons["head.linear.bias"] and "torch.uint8" in reasons["head.linear.bias"]
    assert "torch.int64" in reasons["head.nonlinear.0.bias"]
    assert reasons["head.extra"] == "not a parameter of the configured head"
    assert reasons["head.nonlinear.2.weight"] == "shape (4096,), expected (8, 32, 1, 1)"
    assert reasons["labels"] == "not a parameter of the configured model"
    assert reasons["/data/site/images/img_000.jpg"] == "not a parameter of the configured model"


def test_tensor_subclasses_and_big_endian_arrays_do_not_pass(shapes, honest_state):
    class Carrier(torch.Tensor):
        pass

    sub = honest_state["centroids"].as_subclass(Carrier)
    sub.payload = b"secret"
    big_endian = honest_state["centroids"].numpy().astype(">f4")
    assert wire.check_state({"centroids": sub}, shapes)[0] == {}
    assert "native floating dtype" in dict(wire.check_state({"centroids": big_endian}, shapes)[1])["centroids"]
    masked = np.ma.masked_array(honest_state["centroids"].numpy())
    assert wire.check_state({"centroids": masked}, shapes)[1] == [("centroids", "a MaskedArray, not a tensor")]


@pytest.mark.parametrize("value,reason", [
    (float("nan"), "non-finite values"),
    (float("inf"), "non-finite values"),
    (3e38, "above the bound"),
])
def test_centroids_must_be_finite_and_within_the_norm_bound(shapes, honest_state, value, reason):
    bad = honest_state["centroids"].clone()
    bad[1, 2] = value
    kept, dropped = wire.check_state({"centroids": bad}, shapes)
    assert kept == {} and reason in dict(dropped)["centroids"]


def test_norm_bound_keeps_honest_and_noised_centroids(shapes, honest_state):
    noised = honest_state["centroids"] + 100.0 * torch.randn(3, 8)  # sigma C = 100, D = 8
    assert wire.check_state({"centroids": noised}, shapes)[1] == []
    assert wire.check_state({"centroids": honest_state["centroids"] * 20}, shapes, max_centroid_norm=10)[1]


# ---------------------------------------------------------------------------------------------- numbers, names


@pytest.mark.parametrize("value,max_count,minimum,expected", [
    (6, 6, 1, 6),
    (np.int64(3), 6, 1, 3),
    (0, 0, 0, 0),
    (0, 6, 1, None),
    (-1, 6, 0, None),
    (7, 6, 1, None),
    (2**63 - 1, 6, 1, None),
    (6.0, 6, 1, None),
    (True, 6, 1, None),
    ("6", 6, 1, None),
    (6, None, 1, None),
])
def test_num_samples(value, max_count, minimum, expected):
    checked, reason = wire.check_num_samples(value, max_count, minimum)
    assert checked == expected and (reason is None) == (expected is not None)
    if expected is None:
        assert len(reason) < 120  # a huge number is shortened


def test_site_name():
    assert wire.check_site_name("site-1", ["site-1", "s1"]) == ("site-1", None)
    assert wire.check_site_name("s1", ["site-1", "s1"]) == ("s1", None)
    assert wire.check_site_name("site-2", ["site-1"])[0] is None
    assert wire.check_site_name("x" * 65)[0] is None
    assert wire.check_site_name("a\nb")[0] is None
    assert wire.check_site_name(b"site-1")[1] == "a bytes, not a string"
    assert wire.check_site_name("anything")[0] == "anything"  # no known name: a short printable string


def test_scalar():
    assert wire.check_scalar("train/loss_self", 0.25) == (0.25, None)
    assert wire.check_scalar("val/miou", np.float32(0.5)) == (0.5, None)
    assert wire.check_scalar("train/secret", 1.0)[1] == "not one of the declared analytics tags"
    assert wire.check_scalar("val/miou", "/9j/4AAQSkZJRg==")[1] == "a str, not a number"
    assert wire.check_scalar("val/miou", math.nan)[1] == "not a finite number"
    assert wire.check_scalar("val/miou", True)[1] == "a bool, not a number"


def test_analytics_step():
    assert wire.check_analytics("val/miou", 0.5, 3, 10) == (0.5, 3, None)
    assert wire.check_analytics("val/miou", 0.5, None, 10) == (0.5, None, None)
    for step in (-1, 11, True, 2.0, "3"):
        assert wire.check_analytics("val/miou", 0.5, step, 10) == (None, None, "step is not an integer in 0..10")
    assert wire.check_analytics("train/secret", 0.5, -1, 10)[2] == "not one of the declared analytics tags"
    assert wire.describe_forwarded({"val/miou": 2, "train/loss_self": 1}, 3) == (
        "forwarded 3 scalar(s) (train/loss_self x1, val/miou x2), dropped 3 event(s)")
    assert wire.describe_forwarded({}, 0) == "forwarded 0 scalar(s) (none), dropped 0 event(s)"


def test_filter_history():
    assert wire.check_filter_history(["ExcludeVars", "CentroidPrivacyFilter"]) == (
        ["ExcludeVars", "CentroidPrivacyFilter"], None)
    assert wire.check_filter_history([]) == ([], None)
    for bad in (["/data/site/s1_000.jpg"], ["A" * 65], [b"Filter"], ("ExcludeVars",), ["F"] * 33, "ExcludeVars"):
        assert wire.check_filter_history(bad)[0] is None, bad


# ---------------------------------------------------------------------------------------------- headers

RULES = wire.HeaderRules(return_code="rc", return_codes=frozenset({"OK", "ERROR"}), content_type="type",
                         content_type_value="DXO", name_keys=("task",), round_keys=("round",))


def test_headers_keep_only_the_declared_ones_with_values_of_their_type():
    honest = {"rc": "OK", "type": "DXO", "task": "train", "round": 3}
    assert wire.check_headers(honest, RULES) == (honest, [])
    kept, dropped = wire.check_headers({"rc": "LEAK", "type": "pickle", "task": "x" * 100, "round": 2**40,
                                        "image": b"\xff\xd8"}, RULES)
    assert kept == {} and dropped == [("header[rc]", "not a FLARE return code"),
                                      ("header[type]", "not the DXO content type"),
                                      ("header[task]", "not a printable name of 1..64 characters"),
                                      ("header[round]", "not a round number 0..1000000"),
                                      ("header[image]", "not a header FLARE needs")]
    assert wire.check_headers({"round": True}, RULES)[0] == {}
    assert wire.check_headers(None, RULES) == ({}, [])
    assert wire.check_headers(["rc"], RULES) == ({}, [("headers", "a list, not a dict")])


# ---------------------------------------------------------------------------------------------- metrics

BOUNDS = wire.SiteBounds(num_classes=3, num_clusters=3, training_images=6, validation_images=4)


def test_honest_metrics_pass_as_floats():
    validation = {"miou": 0.5, "pixel_acc": 0.75, "per_class_iou": [0.2, math.nan, 1.0], "clusters_used": 3,
                  "num_images": 4}
    kept, dropped = wire.check_metrics(validation, wire.VALIDATION_METRICS, BOUNDS)
    assert dropped == [] and kept["clusters_used"] == 3.0 and type(kept["num_images"]) is float
    assert kept["per_class_iou"][0] == 0.2 and math.isnan(kept["per_class_iou"][1])
    census = {"is_training_site": 1.0, "is_validation_site": 0.0, "num_samples": 6.0}
    assert wire.check_metrics(census, wire.SITE_INFO_METRICS, BOUNDS) == (census, [])
    train = {"loss_self": -0.3, "steps": 10.0, "seconds": 1.5, "pseudo_labelled": 0.9}
    assert wire.check_metrics(train, wire.TRAIN_METRICS, BOUNDS) == (train, [])


@pytest.mark.parametrize("name,value,reason", [
    ("data_root", "/data/site", "not a declared metric"),
    ("image_ids", ["s1_000"], "not a declared metric"),
    ("loss_self", "/9j/4AAQ", "a str, not a number"),
    ("loss_self", b"\xff\xd8", "a bytes, not a number"),
    ("loss_self", [0.1, 0.2], "a list, not a number"),
    ("loss_self", math.nan, "not a finite number"),
    ("loss_self", -math.inf, "not a finite number"),
    ("loss_self", 10**400, "a int, not a number"),
    ("steps", True, "a bool, not a number"),
    ("miou", 1.5, "outside [0, 1]"),
    ("pixel_acc", -0.1, "outside [0, 1]"),
    ("per_class_iou", [0.1, 0.2], "2 entries, expected one per class (3)"),
    ("per_class_iou", [0.1, 0.2, 1.5], "outside [0, 1]"),
    ("per_class_iou", [0.1, 0.2, "x"], "not a number"),
    ("per_class_iou", np.array([0.1, 0.2, 0.3]), "not a list"),
    ("clusters_used", 4, "0..3"),
    ("clusters_used", 2.5, "not a whole number"),
    ("num_images", 5, "0..4"),
    ("num_samples", 7, "0..6"),
    ("num_samples", -1, "0..6"),
    ("is_training_site", 0.5, "is not 0 or 1"),
])
def test_metric_leaks_are_dropped(name, value, reason):
    allowed = wire.TRAIN_METRICS + wire.VALIDATION_METRICS + wire.SITE_INFO_METRICS
    kept, dropped = wire.check_metrics({name: value, "loss_knn": 0.1}, allowed, BOUNDS)
    assert kept == {"loss_knn": 0.1}
    (dropped_name, why), = dropped
    assert dropped_name == name and reason in why


def test_metrics_with_unknown_bounds_or_not_a_dict():
    kept, dropped = wire.check_metrics({"per_class_iou": [0.1], "num_images": 3, "miou": 0.4},
                                       wire.VALIDATION_METRICS, wire.SiteBounds())
    assert kept == {"miou": 0.4} and {n for n, _ in dropped} == {"per_class_iou", "num_images"}
    assert wire.check_metrics([("miou", 0.4)], wire.VALIDATION_METRICS) == ({}, [("", "a list, not a dict of metrics")])


def test_describe_shortens_what_a_job_chose():
    assert wire.describe("head.linear.weight") == "head.linear.weight"
    long = wire.describe("A" * 5000)
    assert len(long) < 80 and "length 5000" in long
    assert wire.describe(b"\xff" * 100).endswith("(bytes, length 100)")


# ---------------------------------------------------------------------------------------------- the site's data


def test_site_bounds_come_from_the_sites_dataset(tiny_cfg):
    assert wire.site_bounds(tiny_cfg, "site-1") == ("s1", wire.SiteBounds(3, 3, 6, 0))
    assert wire.site_bounds(tiny_cfg, "s3") == ("s3", wire.SiteBounds(3, 3, 0, 4))


def test_a_partition_cannot_declare_images_the_site_does_not_hold(tiny_cfg, tmp_path):
    manifest = {"dataset": "tiny", "strategy": "site", "seed": 0, "num_classes": 3,
                "clients": {"s1": ["s1_000", "s1_001", "s1_001"] + [f"fake_{n}" for n in range(10_000)]},
                "validation": {"s1": ["s1_002", "nope"]}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny_cfg.with_overrides({"partition": str(tmp_path / "manifest.json")})
    assert wire.site_bounds(cfg, "s1") == ("s1", wire.SiteBounds(3, 3, 2, 1))


# ---------------------------------------------------------------------------------------------- a whole result


def test_site_limits():
    assert wire.SiteLimits() == wire.SiteLimits(None, wire.DEFAULT_MAX_HEAD_PARAMETERS, wire.DEFAULT_MAX_CENTROID_NORM)
    assert type(wire.SiteLimits(max_centroid_norm=5).max_centroid_norm) is float
    for bad in ({"max_num_samples": -1}, {"max_num_samples": 4.0}, {"max_num_samples": True},
                {"max_head_parameters": 0}, {"max_centroid_norm": 0.0}, {"max_centroid_norm": math.nan}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            wire.SiteLimits(**bad)


def test_job_schema_from_the_sites_data_under_its_limits(tiny_cfg, tmp_path):
    schema = wire.job_schema(tiny_cfg, "site-1")
    assert schema.bounds == wire.SiteBounds(3, 3, 6, 0) and schema.bounds_problem == ""
    assert set(schema.site_names) == {"site-1", "s1"} and schema.shapes_problem == ""
    assert schema.shapes == wire.expected_state_shapes(tiny_cfg, 3)
    assert wire.job_schema(tiny_cfg, "site-1", wire.SiteLimits(max_num_samples=4)).bounds.training_images == 4
    small = wire.job_schema(tiny_cfg, "site-1", wire.SiteLimits(max_head_parameters=1000, max_centroid_norm=2))
    assert small.shapes is None and "more than this site's max_head_parameters=1000" in small.shapes_problem
    assert small.max_centroid_norm == 2.0
    # a site whose data cannot be resolved: no count is known unless the site sets one
    elsewhere = tiny_cfg.with_overrides({"data.root": str(tmp_path / "nowhere")})
    unknown = wire.job_schema(elsewhere, "site-1")
    assert unknown.bounds.training_images is None and unknown.bounds_problem.startswith("DataError")
    assert unknown.shapes is not None and unknown.site_names == ("site-1",)
    assert wire.job_schema(elsewhere, "site-1", wire.SiteLimits(max_num_samples=10)).bounds.training_images == 10


def schema_for(shapes, **bounds) -> wire.JobSchema:
    return wire.JobSchema(shapes, "", wire.SiteBounds(**{**BOUNDS.__dict__, **bounds}), "", ("site-1", "s1"))


def test_honest_results_pass(shapes, honest_state):
    metrics = {"loss_self": 0.4, "steps": 3.0, "miou": 0.5}
    meta = {"num_samples": 6, "site": "site-1", "initial_metrics": metrics, "filter_history": ["ExcludeVars"]}
    data, kept_meta, dropped = wire.check_result("train", honest_state, meta, schema_for(shapes))
    assert dropped == [] and set(data) == set(honest_state) and kept_meta == meta
    assert wire.describe_sent(data, kept_meta).endswith(
        "meta (num_samples=6, site=site-1, initial_metrics[loss_self, steps, miou], filter_history)")
    census = {"is_training_site": 1.0, "is_validation_site": 0.0, "num_samples": 6.0}
    assert wire.check_result("site_info", census, {"site": "s1"}, schema_for(shapes)) == (census, {"site": "s1"}, [])
    # a validation-only site's train result: no parameters, no image
    assert wire.check_result("train", {}, {"num_samples": 0}, schema_for(shapes)) == ({}, {"num_samples": 0}, [])
    assert wire.check_result("validate", {"miou": 0.5}, None, schema_for(shapes)) == ({"miou": 0.5}, {}, [])


def test_result_leaks_are_named_by_where_they_were(shapes, honest_state):
    meta = {"num_samples": 7, "site": "site-2", "paths": ["/data/x.jpg"], "filter_history": ["/data/x.jpg"],
            "initial_metrics": {"loss_self": "/9j/", "label": b"\x01"}}
    data, kept_meta, dropped = wire.check_result("train", dict(honest_state, image=b"\xff"), meta,
                                                 schema_for(shapes))
    assert set(data) == set(honest_state) and kept_meta == {"initial_metrics": {}}
    assert [name for name, _ in dropped] == ["data[image]", "meta[num_samples]", "meta[site]", "meta[paths]",
                                             "meta[filter_history]", "meta[initial_metrics][loss_self]",
                                             "meta[initial_metrics][label]"]
    # a count only with parameters, a census count and an initial_metrics only in a train result
    _, kept_meta, dropped = wire.check_result("train", {}, {"num_samples": 1}, schema_for(shapes, training_images=0))
    assert kept_meta == {} and "1 is outside 0..0" in dropped[0][1]
    _, kept_meta, dropped = wire.check_result("validate", {}, {"num_samples": 4, "initial_metrics": {}},
                                              schema_for(shapes))
    assert kept_meta == {} and [why for _, why in dropped] == ["not a declared meta key"] * 2
    _, _, dropped = wire.check_result("train", {}, {"initial_metrics": [("miou", 0.3)]}, schema_for(shapes))
    assert dropped == [("meta[initial_metrics]", "a list, not a dict of metrics")]
    # no parameter may leave: every one is named with the schema's reason
    no_model = wire.JobSchema(None, "too large", BOUNDS, "", ("site-1",))
    assert wire.check_result("train", {"centroids": 1}, {}, no_model) == ({}, {}, [("data[centroids]", "too large")])
    with pytest.raises(ValueError, match="not a FUSS result"):
        wire.check_result("exfiltrate", {}, {}, no_model)


def test_audit_descriptions_name_items_never_values():
    assert wire.describe_dropped([]) == "nothing dropped"
    assert wire.describe_dropped([("data[x]", "why"), ("meta[y]", "because")]) == (
        "2 dropped: data[x] (why); meta[y] (because)")
    unknown = wire.JobSchema(None, "", wire.SiteBounds(), "DataError: no data", ())
    assert wire.describe_sent({}, {}, unknown) == (
        "0 item(s) sent (none), meta (none); the site's own counts are unknown: DataError: no data")
