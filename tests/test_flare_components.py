"""The FLARE layer without the simulator: result filter, aggregator (screening, min_clients, rules), job
generator and command line, and that the committed job folders are what the generator produces."""

from __future__ import annotations

import filecmp
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fuss_components.aggregation import AggregationError, ClientUpdate, aggregate
from fuss_components.config import FussConfig
from fuss_components.head import FussModel, split_state
from fuss_flare import ALL_TASKS, CONFIG_FILE, TRAINING_SITES_PROP
from fuss_flare.aggregator import FussAggregator
from fuss_flare.filters import FussResultFilter
from fuss_flare.job import PRESETS, count_sites, main

REPO = Path(__file__).resolve().parents[1]


def model_state(seed: int, clusters: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in FussModel(6, 4, clusters, 0.0).state_dict().items()}


def train_result(state, site: str, n: int, peer: str, **extra_meta) -> Shareable:
    shareable = FLModelUtils.to_shareable(
        FLModel(params=state, metrics={"loss_self": 0.5}, meta={"num_samples": n, "site": site, **extra_meta})
    )
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: peer})
    return shareable


# ---------------------------------------------------------------------------------------------- filter


def test_result_filter_lets_only_head_centroids_and_declared_meta_pass():
    state = model_state(0)
    leaky = dict(state, **{"backbone.patch_embed.proj.weight": torch.zeros(2), "features": torch.zeros(3)})
    shareable = train_result(leaky, "s1", 6, "site-1", image_ids=["a", "b"], data_root="/secret")
    out = FussResultFilter().process(shareable, FLContext())
    dxo = from_shareable(out)
    assert set(dxo.data) == set(state)
    assert set(dxo.meta) == {"num_samples", "site", "initial_metrics"}
    assert dxo.meta["initial_metrics"] == {"loss_self": 0.5}
    assert all(torch.equal(dxo.data[k], state[k]) for k in state)
    assert set(out.keys()) == {"__headers__", "DXO"}

    metrics = DXO(DataKind.METRICS, data={"miou": 0.4, "per_class_iou": [0.1], "confusion": [[1]]},
                  meta={"site": "s3", "paths": ["x"]}).to_shareable()
    dxo = from_shareable(FussResultFilter().process(metrics, FLContext()))
    assert dxo.data == {"miou": 0.4, "per_class_iou": [0.1]} and dxo.meta == {"site": "s3"}


def test_result_filter_fails_closed():
    not_dxo = Shareable()
    not_dxo["raw_features"] = torch.zeros(4)
    out = FussResultFilter().process(not_dxo, FLContext())
    assert out.get_return_code() == ReturnCode.EXECUTION_RESULT_ERROR and "raw_features" not in out
    other_kind = DXO(DataKind.COLLECTION, data={"x": 1}).to_shareable()
    assert FussResultFilter().process(other_kind, FLContext()).get_return_code() == ReturnCode.EXECUTION_RESULT_ERROR
    error = Shareable()
    error.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    error["DXO"] = {"kind": "WEIGHTS", "data": {"secret": 1}, "meta": {}}
    out = FussResultFilter().process(error, FLContext())
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and "DXO" not in out


# ---------------------------------------------------------------------------------------------- aggregator


def make_aggregator(tmp_path, aggregator="fedavg", min_clients=None, training_sites=("site-1", "site-2", "site-3")):
    cfg = FussConfig.from_dict({"federation": {"aggregator": aggregator, "min_clients": min_clients}})
    (tmp_path / "custom").mkdir(exist_ok=True)
    cfg.save(tmp_path / "custom" / CONFIG_FILE)
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(model_state(99), {}), private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 4, private=True, sticky=False)
    fl_ctx.set_prop(TRAINING_SITES_PROP, list(training_sites), private=True, sticky=False)
    agg = FussAggregator()
    agg.handle_event(EventType.START_RUN, fl_ctx)
    return cfg, agg, fl_ctx


@pytest.mark.parametrize("aggregator", ["fedavg", "fedcc-kmeans", "fedcc-maximin"])
def test_aggregator_calls_the_library_rule(tmp_path, aggregator):
    cfg, agg, fl_ctx = make_aggregator(tmp_path, aggregator)
    states = {"s2": model_state(2), "s1": model_state(1), "s3": model_state(3)}
    for i, (site, state) in enumerate(states.items()):
        assert agg.accept(train_result(state, site, 3 + i, f"site-{i}"), fl_ctx)
    out = FLModelUtils.from_shareable(agg.aggregate(fl_ctx))
    updates = [ClientUpdate(s, *split_state(st), 3 + i) for i, (s, st) in enumerate(states.items())]
    head, centroids = aggregate(updates, cfg.federation, 3)
    assert torch.equal(out.params["centroids"], centroids)
    assert all(torch.equal(out.params["head." + k], v) for k, v in head.items())
    assert agg.last_report == {"accepted": ["s1", "s2", "s3"], "rejected": []}


def test_aggregator_rejects_bad_updates_with_reasons_and_enforces_min_clients(tmp_path, caplog):
    good = model_state(1)
    nan = dict(model_state(2), centroids=torch.full((3, 4), math.nan))
    extra = dict(model_state(3), centroids=torch.randn(4, 4))
    shape = dict(model_state(4), **{"head.linear.weight": torch.zeros(2, 2)})
    no_centroids = {k: v for k, v in model_state(5).items() if k != "centroids"}
    batch = [("s1", good), ("s2", nan), ("s3", extra), ("s4", shape), ("s5", no_centroids)]

    _, agg, fl_ctx = make_aggregator(tmp_path, "fedcc-kmeans", min_clients=1)
    with caplog.at_level(logging.WARNING):
        for i, (site, state) in enumerate(batch):
            agg.accept(train_result(state, site, 5, f"site-{i + 1}"), fl_ctx)
        out = FLModelUtils.from_shareable(agg.aggregate(fl_ctx))
    reasons = dict(agg.last_report["rejected"])
    assert agg.last_report["accepted"] == ["s1"]
    assert "NaN" in reasons["s2"]
    assert "(4, 4)" in reasons["s3"] and "(3, 4)" in reasons["s3"]
    assert "head['linear.weight']" in reasons["s4"]
    assert "malformed" in reasons["s5"] and "centroids" in reasons["s5"]
    for site in ("s2", "s3", "s4", "s5"):
        assert f"rejected the update of {site}" in caplog.text
    assert torch.allclose(out.params["head.linear.weight"], good["head.linear.weight"])

    # min_clients unset: every training site the controller found must deliver a usable update
    _, agg, fl_ctx = make_aggregator(tmp_path, "fedavg", training_sites=("site-1", "site-2"))
    agg.accept(train_result(good, "s1", 5, "site-1"), fl_ctx)
    agg.accept(train_result(nan, "s2", 5, "site-2"), fl_ctx)
    with pytest.raises(AggregationError, match=r"1 acceptable client update.*min_clients=2.*NaN"):
        agg.aggregate(fl_ctx)
    # nothing received at all: a clear error, never an index into an empty list
    _, agg, fl_ctx = make_aggregator(tmp_path, "fedavg", min_clients=1)
    with pytest.raises(AggregationError, match="0 acceptable"):
        agg.aggregate(fl_ctx)


# ---------------------------------------------------------------------------------------------- job generator


def _job_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_committed_jobs_are_generated_by_the_definition(tmp_path):
    from fuss_flare.job import export_committed

    export_committed(tmp_path)
    for preset in PRESETS.values():
        committed, fresh = REPO / "jobs" / preset.job, tmp_path / preset.job
        assert _job_files(committed) == _job_files(fresh), preset.job
        for rel in _job_files(fresh):
            assert filecmp.cmp(committed / rel, fresh / rel, shallow=False), f"{preset.job}/{rel} is stale: " \
                "regenerate with `python -m fuss_flare.job committed`"


@pytest.mark.parametrize("preset,clusters,partition,n_sim", [
    ("camvid", 11, "camvid", 4), ("cityscapes", 27, "cityscapes", 4), ("polyp", 2, "polyp", 2),
    ("cocostuff", 27, "cocostuff27", 19)])
def test_committed_job_contents(preset, clusters, partition, n_sim):
    job = REPO / "jobs" / PRESETS[preset].job
    cfg = FussConfig.load(job / "app" / "custom" / CONFIG_FILE)
    assert cfg.train.num_clusters == clusters and cfg.partition == partition
    assert cfg.federation.rounds == 10 and cfg.federation.local_epochs == 1.0 and cfg.federation.local_steps is None
    assert cfg.data.root is None and cfg.cache_dir is None  # resolved on each site
    assert count_sites(cfg, preset)[1] == n_sim
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert server["workflows"][0]["path"] == "fuss_flare.controller.FussController"
    paths = {c["id"]: c["path"] for c in server["components"]}
    assert paths["aggregator"] == "fuss_flare.aggregator.FussAggregator"
    assert paths["persistor"] == "fuss_flare.persistor.FussModelPersistor"
    assert server["server"]["task_request_interval"] == 0.2
    executor = client["executors"][0]
    assert sorted(executor["tasks"]) == sorted(ALL_TASKS)
    assert executor["executor"]["args"]["task_script_path"] == "fuss_flare/client.py"
    (filters,) = client["task_result_filters"]
    assert sorted(filters["tasks"]) == sorted(ALL_TASKS)
    assert filters["filters"][0]["path"] == "fuss_flare.filters.FussResultFilter"
    for module in ("__init__", "client", "controller", "aggregator", "filters", "persistor", "job"):
        assert (job / "app" / "custom" / "fuss_flare" / f"{module}.py").is_file()
    assert not list(job.rglob("__pycache__"))


def test_export_command_line_variants(tmp_path, capsys):
    out = tmp_path / "jobs"
    assert main(["export", "--preset", "camvid", "--rounds", "3", "--local-steps", "20", "--aggregator",
                 "fedcc-maximin", "--fedprox-mu", "0.001", "--moon-weight", "1.0", "--moon-tau", "0.2",
                 "--unweighted", "--no-average-head", "--min-clients", "2", "--set", "train.lr_head=0.001",
                 "--out", str(out), "--name", "camvid_variant"]) == 0
    assert "nvflare simulator" in capsys.readouterr().out
    cfg = FussConfig.load(out / "camvid_variant" / "app" / "custom" / CONFIG_FILE)
    f, t = cfg.federation, cfg.train
    assert (f.rounds, f.local_steps, f.aggregator, f.weighted, f.average_head, f.aggregate_centroids,
            f.min_clients) == (3, 20, "fedcc-maximin", False, False, True, 2)
    assert (t.fedprox_mu, t.moon_weight, t.moon_tau, t.lr_head, t.num_clusters) == (0.001, 1.0, 0.2, 0.001, 11)
    server = json.loads((out / "camvid_variant" / "app" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["num_rounds"] == 3
    assert json.loads((out / "camvid_variant" / "meta.json").read_text())["min_clients"] == 2

    assert main(["export", "--preset", "cityscapes", "--clients", "18", "--out", str(out)]) == 0
    cfg = FussConfig.load(out / "fuss_cityscapes_18clients" / "app" / "custom" / CONFIG_FILE)
    assert cfg.partition == "cityscapes:18" and count_sites(cfg, "cityscapes") == (18, 19)
    assert main(["export", "--preset", "cityscapes", "--clients", "5", "--out", str(out)]) == 2
    assert "--clients 5" in capsys.readouterr().err
    # unknown config key: rejected before anything is written
    assert main(["export", "--preset", "polyp", "--set", "train.nope=1", "--out", str(out)]) == 2
    assert "train.nope" in capsys.readouterr().err and not (out / "fuss_polyp").exists()


def test_fuss_cli_delegates_job_export(tmp_path):
    from fuss_components.cli import main as fuss_main

    assert fuss_main(["job", "export", "--preset", "polyp", "--aggregator", "fedavg", "--out", str(tmp_path)]) == 0
    cfg = FussConfig.load(tmp_path / "fuss_polyp" / "app" / "custom" / CONFIG_FILE)
    assert cfg.federation.aggregator == "fedavg" and cfg.train.num_clusters == 2
