"""The site's privacy filters on real FLARE objects: Shareables, DXOs, an FLContext, the filter chain FLARE runs
(``apply_filters`` with a site scope built like a ``privacy.json`` scope, then the job's filters) and FLARE's own
job audit log. No FLARE process is started."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsData, AnalyticsDataType, LogWriterName, TrackConst
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import FilterChainType, FilterContextKey, FilterSource
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import EventScope, FilterKey, FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.apis.utils.task_utils import apply_filters
from nvflare.fuel.sec.audit import Auditor, AuditService
from nvflare.private.privacy_manager import Scope

from fuss_components import wire
from fuss_components.site import init_global_state
from fuss_flare import ALL_TASKS, CONFIG_FILE, META_NUM_SAMPLES, META_SITE
from fuss_flare import SITE_CONFIG_ENV
from fuss_flare.filters import CentroidPrivacyFilter, FussAnalyticsForwarder, FussResultFilter

JPEG = bytes([0xFF, 0xD8, 0xFF, 0xE0]) + bytes(range(256)) * 15 + bytes(252)  # 4,096 bytes
TRAIN_METRICS = {"loss_self": 0.4, "loss_knn": 0.2, "loss_random": -0.1, "loss_centroids": -0.8, "steps": 3.0,
                 "clusters_reseeded": 0.0, "clusters_used": 3.0, "seconds": 0.5, "skipped_images": 0.0}
VALIDATION = {"miou": 0.31, "pixel_acc": 0.62, "per_class_iou": [0.5, math.nan, 0.12], "clusters_used": 3.0,
              "num_images": 4}


@pytest.fixture
def audit(tmp_path):
    """FLARE's job audit log, written to a file for the test; returns a reader of its lines."""
    previous = AuditService.the_auditor
    path = tmp_path / "audit.log"
    AuditService.the_auditor = Auditor(str(path))
    yield lambda: path.read_text().splitlines()
    AuditService.the_auditor.close()
    AuditService.the_auditor = previous


@pytest.fixture
def app(tiny_cfg, tmp_path, monkeypatch):
    """A job's app folder on the site: ``config/fuss_config.json`` of the tiny dataset (sites s1: 6 training
    images, s2: 5, s3: 4 validation images; FLARE names site-1, site-2, site-3)."""
    monkeypatch.delenv(SITE_CONFIG_ENV, raising=False)
    root = tmp_path / "app_site"
    tiny_cfg.save(root / "config" / CONFIG_FILE)
    return root


@pytest.fixture
def state(tiny_cfg):
    return init_global_state(tiny_cfg)


def context(app, task: str, site: str = "site-1") -> FLContext:
    fl_ctx = FLContext()
    for key, value in ((FLContextKey.APP_ROOT, str(app)), (FLContextKey.TASK_NAME, task),
                       (FLContextKey.TASK_ID, "t-1"), (ReservedKey.IDENTITY_NAME, site), (ReservedKey.RUN_NUM, "job-1"),
                       (FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, "fuss")):
        fl_ctx.set_prop(key, value, private=True, sticky=False)
    return fl_ctx


def run_chain(shareable: Shareable, fl_ctx: FLContext, site_filters=(), job_filters=()) -> Shareable:
    """FLARE's task-result chain: the site scope's filters (as from privacy.json), then the job's."""
    scope = Scope()
    scope.set_name("fuss")
    for flt in site_filters:
        scope.add_task_result_filter(flt, FilterKey.OUT)
    for flt in job_filters:
        flt.set_prop(FilterContextKey.SOURCE, FilterSource.JOB)
        flt.set_prop(FilterContextKey.CHAIN_TYPE, FilterChainType.TASK_RESULT_CHAIN)
    fl_ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=True, sticky=False)
    task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
    return apply_filters(Scope.TASK_RESULT_FILTERS_NAME, shareable, fl_ctx,
                         {f"{task}{FilterKey.DELIMITER}{FilterKey.OUT}": list(job_filters)}, task, FilterKey.OUT)


def site_filter(shareable: Shareable, fl_ctx: FLContext, **kwargs) -> Shareable:
    return run_chain(shareable, fl_ctx, site_filters=[FussResultFilter(**kwargs)])


def train_result(state, num_samples=6, site="site-1", metrics=None, **meta) -> Shareable:
    meta = {"num_samples": num_samples, "site": site, MetaKey.INITIAL_METRICS: dict(metrics or TRAIN_METRICS), **meta}
    return DXO(DataKind.WEIGHTS, data=dict(state), meta=meta).to_shareable()


def filter_lines(lines, name="FussResultFilter"):
    return [line.split("applied filter: ", 1)[1] for line in lines if f"applied filter: {name}@" in line]


# ---------------------------------------------------------------------------------------------- FLARE's names


def test_the_names_wire_checks_are_flares_and_fuss_flares():
    assert (wire.META_INITIAL_METRICS, wire.META_FILTER_HISTORY) == (MetaKey.INITIAL_METRICS, MetaKey.FILTER_HISTORY)
    assert (wire.META_NUM_SAMPLES, wire.META_SITE) == ("num_samples", "site")  # what the aggregator reads
    assert [wire.TRAIN_RESULT, wire.VALIDATE_RESULT, wire.SITE_INFO_RESULT] == ALL_TASKS


# ---------------------------------------------------------------------------------------------- honest results


def test_honest_results_pass_site_and_job_filters_unchanged(app, state, audit):
    out = run_chain(train_result(state), context(app, "train"), [FussResultFilter()], [FussResultFilter()])
    dxo = from_shareable(out)
    assert out.get_return_code() == ReturnCode.OK and set(out) == {ReservedHeaderKey.HEADERS, "DXO"}
    assert set(dxo.data) == set(state) and all(torch.equal(dxo.data[k], state[k]) for k in state)
    assert dxo.meta == {"num_samples": 6, "site": "site-1", "initial_metrics": TRAIN_METRICS}
    site_line, job_line = filter_lines(audit())
    assert site_line.startswith("FussResultFilter@site on task_result: train WEIGHTS 7 item(s) sent (centroids, head.")
    assert "meta (num_samples=6, site=site-1, initial_metrics[loss_self, " in site_line
    assert site_line.endswith("; nothing dropped") and job_line.startswith("FussResultFilter@job on task_result: ")

    # a site that validates and trains sends both metric sets in a train result
    both = train_result(state, metrics={**TRAIN_METRICS, **VALIDATION, "num_images": 0})  # s1 validates on none
    metrics = from_shareable(site_filter(both, context(app, "train"))).meta["initial_metrics"]
    assert set(metrics) == set(TRAIN_METRICS) | set(VALIDATION) and math.isnan(metrics["per_class_iou"][1])

    # a validation-only site's zero-weight train result, its final validation, and the site census
    zero = DXO(DataKind.WEIGHTS, data={}, meta={"num_samples": 0, "site": "site-3",
                                               "initial_metrics": VALIDATION}).to_shareable()
    dxo = from_shareable(site_filter(zero, context(app, "train", "site-3")))
    assert dxo.data == {} and dxo.meta["num_samples"] == 0 and dxo.meta["initial_metrics"]["num_images"] == 4.0
    validate = DXO(DataKind.METRICS, data=VALIDATION, meta={"site": "site-3"}).to_shareable()
    dxo = from_shareable(site_filter(validate, context(app, "validate", "site-3")))
    assert set(dxo.data) == set(VALIDATION) and dxo.meta == {"site": "site-3"}
    census = {"is_training_site": 1.0, "is_validation_site": 0.0, "num_samples": 6.0}
    info = DXO(DataKind.METRICS, data=census, meta={"site": "site-1"}).to_shareable()
    assert from_shareable(site_filter(info, context(app, "site_info"))).data == census
    assert all(line.endswith("nothing dropped") for line in filter_lines(audit()))


# ---------------------------------------------------------------------------------------------- a hostile job


def test_hostile_train_result_loses_everything_undeclared_and_the_audit_says_so(app, state, audit):
    """The leak that once passed as '8 item(s) sent, nothing dropped': raw JPEG bytes as a parameter, a
    parameter under head.* with a made-up name, label bytes, site file paths in meta and metrics."""
    data = dict(state)
    data["head.linear.weight"] = torch.frombuffer(bytearray(JPEG), dtype=torch.uint8)  # JPEG under a real name
    data["head.stash"] = torch.frombuffer(bytearray(JPEG), dtype=torch.float32)  # float, but not a head parameter
    data["head.nonlinear.0.bias"] = torch.zeros(32, dtype=torch.int32)
    data["labels"] = np.zeros((40, 56), np.uint8)
    data["image"] = JPEG
    metrics = dict(TRAIN_METRICS, image_path="/data/tiny/images/train/s1_000.jpg", label=b"\x01\x02",
                   loss_self="/9j/4AAQSkZJRgABAQ")
    shareable = train_result(data, metrics=metrics, paths=["/data/tiny/images/train/s1_000.jpg"],
                             label_bytes=b"\x00\x01\x02")
    dxo = from_shareable(site_filter(shareable, context(app, "train")))
    assert set(dxo.data) == set(state) - {"head.linear.weight", "head.nonlinear.0.bias"}
    assert all(torch.equal(dxo.data[k], state[k]) for k in dxo.data)
    assert set(dxo.meta) == {"num_samples", "site", "initial_metrics"}
    assert dxo.meta["initial_metrics"] == {k: v for k, v in TRAIN_METRICS.items() if k != "loss_self"}
    (line,) = filter_lines(audit())
    assert "train WEIGHTS 5 item(s) sent" in line and "nothing dropped" not in line and "; 10 dropped: " in line
    for expected in ("data[head.linear.weight] (dtype torch.uint8, not a floating dtype)",
                     "data[head.stash] (not a parameter of the configured head)",
                     "data[head.nonlinear.0.bias] (dtype torch.int32, not a floating dtype)",
                     "data[labels] (not a parameter of the configured model)",
                     "data[image] (not a parameter of the configured model)",
                     "meta[paths] (not a declared meta key)", "meta[label_bytes] (not a declared meta key)",
                     "meta[initial_metrics][image_path] (not a declared metric)",
                     "meta[initial_metrics][label] (not a declared metric)",
                     "meta[initial_metrics][loss_self] (a str, not a number)"):
        assert expected in line, expected
    assert "9j/4AAQ" not in line and "s1_000" not in line  # values are never written, only names


def test_wrong_shapes_and_dtypes_under_real_names(app, state, audit):
    data = dict(state, **{"head.linear.bias": torch.zeros(4096), "centroids": state["centroids"].double(),
                          "head.linear.weight": state["head.linear.weight"].numpy()})
    dxo = from_shareable(site_filter(train_result(data), context(app, "train")))
    assert set(dxo.data) == set(state) - {"head.linear.bias"}
    assert dxo.data["centroids"].dtype == torch.float64 and isinstance(dxo.data["head.linear.weight"], np.ndarray)
    assert "data[head.linear.bias] (shape (4096,), expected (8,))" in filter_lines(audit())[0]


@pytest.mark.parametrize("value,reason", [
    (math.nan, "non-finite values"),
    (math.inf, "non-finite values"),
    (3e38, "above the bound 10000"),
])
def test_centroids_non_finite_or_huge(app, state, audit, value, reason):
    centroids = state["centroids"].clone()
    centroids[0, 0] = value
    dxo = from_shareable(site_filter(train_result(dict(state, centroids=centroids)), context(app, "train")))
    assert "centroids" not in dxo.data and len(dxo.data) == 6
    assert "data[centroids] (" in filter_lines(audit())[0] and reason in filter_lines(audit())[0]


@pytest.mark.parametrize("value", [-1, 0, 7, 10**6, 2**63 - 1, 6.0, 5.5, True, "6", None, [6]])
def test_num_samples_out_of_bounds_or_not_an_integer(app, state, audit, value):
    dxo = from_shareable(site_filter(train_result(state, num_samples=value), context(app, "train")))
    assert "num_samples" not in dxo.meta and len(dxo.data) == 7
    assert "meta[num_samples] (" in filter_lines(audit())[0]


def test_num_samples_bounds(app, state, audit):
    assert from_shareable(site_filter(train_result(state, 6), context(app, "train"))).meta["num_samples"] == 6
    five = from_shareable(site_filter(train_result(state, 5, "site-2"), context(app, "train", "site-2")))
    assert five.meta == {"num_samples": 5, "site": "site-2", "initial_metrics": TRAIN_METRICS}
    out = from_shareable(site_filter(train_result(state, 6, "site-2"), context(app, "train", "site-2")))
    assert "num_samples" not in out.meta  # site-2 holds 5 training images
    # a site's own bound is tighter than its dataset
    assert "num_samples" not in from_shareable(site_filter(train_result(state, 6), context(app, "train"),
                                                           max_num_samples=4)).meta
    assert from_shareable(site_filter(train_result(state, 4), context(app, "train"),
                                      max_num_samples=4)).meta["num_samples"] == 4
    # a validation-only site declares no training image
    zero = DXO(DataKind.WEIGHTS, data={}, meta={"num_samples": 1, "site": "site-3"}).to_shareable()
    assert "num_samples" not in from_shareable(site_filter(zero, context(app, "train", "site-3"))).meta
    lines = filter_lines(audit())
    assert "meta[num_samples] (6 is outside 1..5 (the site's training images))" in lines[2]
    assert "outside 1..4" in lines[3] and "meta[num_samples] (1 is outside 0..0" in lines[-1]


def test_site_data_unknown_no_count_leaves_unless_the_site_sets_one(app, state, audit, tiny_cfg, tmp_path,
                                                                   monkeypatch):
    overrides = tmp_path / "fuss_site.json"
    overrides.write_text('{"data.root": "%s"}' % (tmp_path / "nowhere"))
    monkeypatch.setenv(SITE_CONFIG_ENV, str(overrides))
    dxo = from_shareable(site_filter(train_result(state), context(app, "train")))
    assert "num_samples" not in dxo.meta and len(dxo.data) == 7  # |C| is configured: the model is known
    line = filter_lines(audit())[0]
    assert "the site's image count is unknown" in line and "the site's own counts are unknown: DataError" in line
    dxo = from_shareable(site_filter(train_result(state), context(app, "train"), max_num_samples=10))
    assert dxo.meta["num_samples"] == 6


def test_site_meta_must_be_this_sites_name(app, state, audit):
    for declared in ("site-2", "x" * 65, b"site-1", "/data/tiny/images/train/s1_000.jpg"):
        dxo = from_shareable(site_filter(train_result(state, site=declared), context(app, "train")))
        assert "site" not in dxo.meta
    partition_name = from_shareable(site_filter(train_result(state, site="s1"), context(app, "train")))
    assert partition_name.meta["site"] == "s1"
    assert all("meta[site] (" in line for line in filter_lines(audit())[:4])


def test_filter_history_is_kept_only_as_filter_names(app, state, audit):
    ok = train_result(state, **{MetaKey.FILTER_HISTORY: ["ExcludeVars"]})
    assert from_shareable(site_filter(ok, context(app, "train"))).meta[MetaKey.FILTER_HISTORY] == ["ExcludeVars"]
    bad = train_result(state, **{MetaKey.FILTER_HISTORY: ["/data/site/s1_000.jpg"]})
    assert MetaKey.FILTER_HISTORY not in from_shareable(site_filter(bad, context(app, "train"))).meta


def test_model_larger_than_the_site_allows_sends_no_parameters(app, state, audit):
    dxo = from_shareable(site_filter(train_result(state), context(app, "train"), max_head_parameters=1000))
    assert dxo.data == {} and dxo.meta["num_samples"] == 6  # the server rejects a count without parameters
    line = filter_lines(audit())[0]
    assert "more than this site's max_head_parameters=1000" in line and "train WEIGHTS 0 item(s) sent" in line


# ---------------------------------------------------------------------------------------------- metrics results


@pytest.mark.parametrize("name,value,reason", [
    ("miou", "0.31", "a str, not a number"),
    ("miou", math.nan, "not a finite number"),
    ("pixel_acc", math.inf, "not a finite number"),
    ("miou", 1.2, "outside [0, 1]"),
    ("per_class_iou", [0.5, 0.2], "2 entries, expected one per class (3)"),
    ("per_class_iou", [0.5, 0.2, 7.0], "outside [0, 1]"),
    ("per_class_iou", [0.5, 0.2, "/data/x.png"], "not a number"),
    ("clusters_used", 4, "0..3"),
    ("num_images", 5, "0..4"),
    ("confusion", [[1, 2], [3, 4]], "not a declared metric"),
    ("image_ids", ["s3_000"], "not a declared metric"),
])
def test_validation_metric_leaks(app, audit, name, value, reason):
    shareable = DXO(DataKind.METRICS, data=dict(VALIDATION, **{name: value}), meta={"site": "site-3"}).to_shareable()
    dxo = from_shareable(site_filter(shareable, context(app, "validate", "site-3")))
    assert name not in dxo.data and set(dxo.data) == set(VALIDATION) - {name}
    assert f"data[{name}] (" in filter_lines(audit())[0] and reason in filter_lines(audit())[0]


@pytest.mark.parametrize("name,value", [("num_samples", 6.5), ("num_samples", 7.0), ("num_samples", -1.0),
                                        ("is_training_site", 2.0), ("is_validation_site", "yes"),
                                        ("data_root", "/data")])
def test_site_census_leaks(app, audit, name, value):
    census = {"is_training_site": 1.0, "is_validation_site": 0.0, "num_samples": 6.0}
    shareable = DXO(DataKind.METRICS, data=dict(census, **{name: value}), meta={"site": "site-1"}).to_shareable()
    dxo = from_shareable(site_filter(shareable, context(app, "site_info")))
    assert name not in dxo.data and f"data[{name}] (" in filter_lines(audit())[0]


# ---------------------------------------------------------------------------------------------- fail closed


def refused(out: Shareable) -> bool:
    return out.get_return_code() == ReturnCode.EXECUTION_RESULT_ERROR and set(out) == {ReservedHeaderKey.HEADERS}


def test_fails_closed_on_what_it_cannot_read(app, state, audit):
    not_dxo = Shareable()
    not_dxo["raw_features"] = torch.zeros(4)
    assert refused(site_filter(not_dxo, context(app, "train")))
    metrics_for_train = DXO(DataKind.METRICS, data={"miou": 0.3}).to_shareable()
    assert refused(site_filter(metrics_for_train, context(app, "train")))
    weights_for_validate = DXO(DataKind.WEIGHTS, data=dict(state)).to_shareable()
    assert refused(site_filter(weights_for_validate, context(app, "validate")))
    collection = DXO(DataKind.COLLECTION, data={"x": DXO(DataKind.WEIGHTS, data=dict(state))}).to_shareable()
    assert refused(site_filter(collection, context(app, "train")))
    assert refused(site_filter(train_result(state), context(app, "exfiltrate")))
    no_config = context(app.parent / "elsewhere", "train")
    assert refused(site_filter(train_result(state), no_config))
    lines = filter_lines(audit())
    assert len(lines) == 6 and all("refused, nothing sent: " in line for line in lines)
    assert "the train result is not a DXO" in lines[0] and "must be a WEIGHTS DXO, not METRICS" in lines[1]
    assert "task exfiltrate is not a FUSS task" in lines[4] and "FUSS configuration cannot be read" in lines[5]


def test_error_replies_and_headers_carry_nothing(app, state, audit):
    error = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    error["DXO"] = {"kind": "WEIGHTS", "data": {"secret": JPEG}, "meta": {}}
    error.set_header("leak", JPEG)
    out = site_filter(error, context(app, "train"))
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and "DXO" not in out
    assert "leak" not in out[ReservedHeaderKey.HEADERS]

    result = train_result(state)
    result.set_header("image", JPEG)
    result.set_header(ReservedHeaderKey.TASK_ID, "/data/" + "x" * 100)
    result["beside_the_dxo"] = JPEG
    out = site_filter(result, context(app, "train"))
    assert set(out) == {ReservedHeaderKey.HEADERS, "DXO"} and len(from_shareable(out).data) == 7
    assert set(out[ReservedHeaderKey.HEADERS]) == {ReservedHeaderKey.CONTENT_TYPE}
    error_line, line = filter_lines(audit())
    assert "error reply EXECUTION_EXCEPTION: nothing sent" in error_line and "header[leak]" in error_line
    for expected in ("header[image] (not a header FLARE needs)", "header[__task_id__] (",
                     "payload[beside_the_dxo] (outside the DXO)"):
        assert expected in line


# ---------------------------------------------------------------------------------------------- with the noise filter


def test_site_policy_with_centroid_noise_then_the_jobs_filter(app, state, audit):
    site = [FussResultFilter(), CentroidPrivacyFilter(clip=1.0, noise_multiplier=1.0)]
    out = run_chain(train_result(state), context(app, "train"), site, [FussResultFilter()])
    dxo = from_shareable(out)
    assert set(dxo.data) == set(state) and not torch.equal(dxo.data["centroids"], state["centroids"])
    assert dxo.meta[MetaKey.FILTER_HISTORY] == ["CentroidPrivacyFilter"]
    order = [line.split("applied filter: ")[1].split(" on ")[0] for line in audit() if "applied filter: " in line]
    assert order == ["FussResultFilter@site", "CentroidPrivacyFilter@site", "FussResultFilter@job"]
    assert filter_lines(audit())[-1].endswith("nothing dropped")


# ---------------------------------------------------------------------------------------------- analytics


class RecordingEngine:
    """The part of FLARE's client engine an event needs: it dispatches every event to the site's components and
    records the federated ones (what FLARE's ClientFedEventRunner would send to the server)."""

    def __init__(self, *components):
        self.components = components
        self.sent = []

    def fire_event(self, event_type: str, fl_ctx: FLContext):
        if fl_ctx.get_prop(FLContextKey.EVENT_SCOPE) == EventScope.FEDERATION:
            self.sent.append((event_type, fl_ctx.get_prop(FLContextKey.EVENT_DATA)))
        for component in self.components:
            component.handle_event(event_type, fl_ctx)


@pytest.fixture
def analytics(app, audit):
    forwarder = FussAnalyticsForwarder()
    engine = RecordingEngine(forwarder)
    fl_ctx = context(app, "train")
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    sender = FLComponent()

    def send(dxo: DXO):
        send_analytic_dxo(sender, dxo, fl_ctx)

    return forwarder, engine, fl_ctx, send


def analytic(tag, value, data_type=AnalyticsDataType.SCALAR, step=1) -> DXO:
    dxo = DXO(DataKind.ANALYTIC, data={TrackConst.TRACK_KEY: tag, TrackConst.TRACK_VALUE: value,
                                       TrackConst.GLOBAL_STEP_KEY: step})
    dxo.set_meta_prop(TrackConst.DATA_TYPE_KEY, data_type)
    dxo.set_meta_prop(TrackConst.TRACKER_KEY, LogWriterName.TORCH_TB)
    return dxo


def test_declared_scalars_are_forwarded_as_fresh_events(analytics, audit):
    forwarder, engine, fl_ctx, send = analytics
    dxo = create_analytic_dxo("train/loss_self", 0.25, AnalyticsDataType.SCALAR, global_step=3, walltime=5.0)
    dxo.meta["extra"] = JPEG
    send(dxo)
    send(create_analytic_dxo("val/miou", np.float32(0.5), AnalyticsDataType.SCALAR, global_step=0))
    assert [event for event, _ in engine.sent] == [f"fed.{ANALYTIC_EVENT_TYPE}"] * 2
    first = from_shareable(engine.sent[0][1])
    assert first.data == {TrackConst.TRACK_KEY: "train/loss_self", TrackConst.TRACK_VALUE: 0.25,
                          TrackConst.GLOBAL_STEP_KEY: 3, TrackConst.KWARGS_KEY: {TrackConst.GLOBAL_STEP_KEY: 3}}
    assert "extra" not in first.meta
    received = AnalyticsData.from_dxo(from_shareable(engine.sent[1][1]))  # what the server's receiver reads
    assert (received.tag, received.value, received.step) == ("val/miou", 0.5, 0)
    forwarder.handle_event(EventType.END_RUN, fl_ctx)
    assert audit()[-1].endswith("FussAnalyticsForwarder: forwarded 2 scalar(s) (train/loss_self x1, val/miou x1), "
                                "dropped 0 event(s)")


@pytest.mark.parametrize("dxo,reason", [
    (analytic("val/miou", "/9j/4AAQSkZJRgABAQ", AnalyticsDataType.TEXT), "TEXT analytics are not forwarded"),
    (analytic("val/overlay", np.zeros((4, 4, 3), np.uint8), AnalyticsDataType.IMAGE), "IMAGE analytics"),
    (analytic("val/miou", {"a": 1.0}, AnalyticsDataType.SCALARS), "SCALARS analytics are not forwarded"),
    (analytic("train/secret", 1.0), "not one of the declared analytics tags"),
    (analytic("/data/tiny/images/train/s1_000.jpg", 1.0), "not one of the declared analytics tags"),
    (analytic("val/miou", "0.5"), "a str, not a number"),
    (analytic("val/miou", math.nan), "not a finite number"),
    (analytic("val/miou", -math.inf), "not a finite number"),
    (analytic("val/miou", 0.5, step=-1), "step is not an integer"),
    (analytic("val/miou", 0.5, step=2**40), "step is not an integer"),
    (analytic("val/miou", 0.5, step=True), "step is not an integer"),
    (DXO(DataKind.WEIGHTS, data={"x": torch.zeros(2)}), "a WEIGHTS DXO, not analytics"),
])
def test_everything_else_stays_on_the_site(analytics, audit, dxo, reason):
    forwarder, engine, fl_ctx, send = analytics
    send(dxo)
    assert engine.sent == [] and forwarder.dropped == 1
    (line,) = [x for x in audit() if "FussAnalyticsForwarder: not forwarded: " in x]
    assert reason in line and "9j/4AAQ" not in line


def test_non_shareable_and_federated_events_are_not_forwarded(analytics, audit):
    forwarder, engine, fl_ctx, _ = analytics
    fl_ctx.set_prop(FLContextKey.EVENT_DATA, "raw text", private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.EVENT_SCOPE, EventScope.LOCAL, private=True, sticky=False)
    forwarder.handle_event(ANALYTIC_EVENT_TYPE, fl_ctx)
    assert "event data is a str, not a Shareable" in audit()[-1]
    fl_ctx.set_prop(FLContextKey.EVENT_DATA, analytic("val/miou", 0.5).to_shareable(), private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.EVENT_SCOPE, EventScope.FEDERATION, private=True, sticky=False)
    forwarder.handle_event(ANALYTIC_EVENT_TYPE, fl_ctx)
    assert engine.sent == [] and forwarder.dropped == 1
