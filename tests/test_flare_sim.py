"""End to end through the real NVIDIA FLARE simulator (`nvflare simulator JOB -w WS`, a subprocess, the sites of
the job's deploy_map) on the tiny synthetic dataset with the tiny random backbone: 2 training sites (s1, s2) + 1
validation site (s3), 2 rounds.

One simulator run per aggregator (about 30 s each here); every assertion about a run is made on the same run:
completion, model files, the aggregation rule recomputed from what the server received, metrics streamed
(TensorBoard files + metrics.json), and the wire content. Plus: hostile sites (test-only code in
``tests/flare_hostile``, shipped as a BYOC app the simulator allows: a hostile job's code on a site whose filters
still run, and hostile peers without filters), a missing data root, and parity with the in-process runner.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_dataset, tiny_config
from fuss_components.aggregation import (ClientUpdate, average_centroids, centroid_drift, fedavg_weights, fedcc_kmeans,
                                         normalize_rows)
from fuss_components.config import FussConfig
from fuss_components.head import split_state
from benchmarks.simulator import run_simulator

pytestmark = pytest.mark.flare

MODEL_KEYS = {
    "centroids",
    "head.linear.weight",
    "head.linear.bias",
    "head.nonlinear.0.weight",
    "head.nonlinear.0.bias",
    "head.nonlinear.2.weight",
    "head.nonlinear.2.bias",
}
DECLARED_META = {"num_samples", "site", "initial_metrics"}  # initial_metrics: the DXO's metrics slot
HOSTILE_DIR = Path(__file__).resolve().parent / "flare_hostile"
TIMINGS: dict[str, float] = {}


@dataclass
class Sim:
    rc: int
    log: str
    ws: Path
    seconds: float

    @property
    def app(self) -> Path:
        return self.ws / "server" / "simulate_job" / "app_server"

    @property
    def metrics(self) -> dict:
        return json.loads((self.app / "metrics.json").read_text())

    def received(self, round_idx: int) -> dict:
        return torch.load(self.app / "received" / f"round_{round_idx}.pt", weights_only=True)

    def global_state(self) -> dict:
        return torch.load(self.app / "FL_global_model.pt", weights_only=True)["model"]

    def all_logs(self) -> str:
        return self.log + "".join(p.read_text(errors="replace") for p in self.ws.rglob("log.txt"))


def export_job(cfg: FussConfig, out: Path, name: str, *extra: str) -> Path:
    """Through the generator's command line (`fuss job export --config ...`)."""
    from fuss_flare.job import main

    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / f"{name}.json"
    cfg.save(cfg_file)
    assert main(["export", "--config", str(cfg_file), "--out", str(out / "jobs"), "--name", name, *extra]) == 0
    return out / "jobs" / name


def add_hostile_app(job: Path, app: str, sites: list[str], faults: dict, keep_filters: bool) -> None:
    """Deploy ``app`` (a copy of the job's app whose executor is tests/flare_hostile's HostileExecutor, shipped in
    its ``custom/`` folder) to ``sites`` instead of the honest app. ``keep_filters``: the site's result filter
    still runs (hostile job code on an honest site); False: a hostile peer that sends whatever it likes."""
    import shutil

    shutil.copytree(job / "app", job / app)
    shutil.copytree(HOSTILE_DIR, job / app / "custom", ignore=shutil.ignore_patterns("__pycache__"))
    client_cfg = job / app / "config" / "config_fed_client.json"
    cfg = json.loads(client_cfg.read_text())
    cfg["executors"][0]["executor"] = {"path": "hostile_executor.HostileExecutor", "args": {"faults": faults}}
    if not keep_filters:
        cfg["task_result_filters"] = []
    client_cfg.write_text(json.dumps(cfg, indent=2))
    (job / app / "config" / "config_fed_server.json").unlink()
    meta = json.loads((job / "meta.json").read_text())
    meta["deploy_map"]["app"] = [s for s in meta["deploy_map"]["app"] if s not in sites]
    meta["deploy_map"][app] = list(sites)
    (job / "meta.json").write_text(json.dumps(meta, indent=2))


def simulate(job: Path, ws: Path, n: int | None = None, env: dict | None = None, timeout: int = 300) -> Sim:
    """The real simulator through benchmarks.simulator (which restarts it after FLARE's start-up races)."""
    run = run_simulator(job, ws, n, env=env, timeout=timeout)
    sim = Sim(run.returncode, run.output, run.workspace, run.seconds)
    TIMINGS[job.name] = sim.seconds
    return sim


@pytest.fixture(scope="module")
def flare_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flare_cache")  # feature cache shared by the runs (keyed, so safe)


@pytest.fixture(scope="module")
def runs(tiny_data_root, flare_cache, tmp_path_factory) -> dict:
    """aggregator -> (config, Sim); runs lazily, each at most once per module."""
    cache: dict = {}

    def get(aggregator: str) -> tuple[FussConfig, Sim]:
        if aggregator not in cache:
            cfg = tiny_config(tiny_data_root, flare_cache, **{"partition": "site", "federation.aggregator": aggregator})
            tmp = tmp_path_factory.mktemp(f"sim_{aggregator}")
            # the fedavg run also has the server export the final model (the job option; about 2 s)
            # and the fedcc-maximin run streams to MLflow too (a SQLite store in the server's job folder)
            export = {"fedavg": ["--export-format", "torchscript"], "fedcc-maximin": ["--mlflow"]}.get(aggregator, [])
            job = export_job(cfg, tmp, f"tiny_{aggregator.replace('-', '_')}", "--record-updates", *export)
            cache[aggregator] = (cfg, simulate(job, tmp / "ws"))
        return cache[aggregator]

    yield get
    if TIMINGS:
        print("\nsimulator wall seconds:", {k: round(v, 1) for k, v in TIMINGS.items()})


def _updates(received: dict) -> list[tuple[str, dict, torch.Tensor, int]]:
    """(site, head, centroids, N_k) of every received update, sorted by site like the aggregator."""
    out = []
    for name, entry in received.items():
        meta = json.loads(entry["meta"])
        head, centroids = split_state(entry["params"])
        out.append((name, head, centroids, meta["num_samples"]))
    return sorted(out, key=lambda u: u[0])


def _check_rule(aggregator: str, cfg: FussConfig, updates, global_centroids: torch.Tensor) -> None:
    sets = [u[2] for u in updates]
    weights = fedavg_weights([u[3] for u in updates], cfg.federation.weighted)
    pool = normalize_rows(torch.cat(sets).double()).float()
    k = global_centroids.shape[0]
    if aggregator == "fedavg":
        # Eq. 9 on row-normalised centroids, computed here by hand: row c = normalised sum_k alpha_k * c_k
        manual = sum(float(w) * normalize_rows(s.double()) for w, s in zip(weights, sets))
        assert torch.allclose(global_centroids, normalize_rows(manual).float(), atol=1e-6)
        assert torch.allclose(global_centroids, average_centroids(sets, weights), atol=1e-7)
    elif aggregator == "fedcc-kmeans":
        # k-means centres of the pooled, normalised client centroids: a Lloyd fixed point (every centre is the
        # normalised mean of the pool members nearest to it) and exactly the library's seeded result
        assign = torch.cdist(pool, global_centroids).argmin(dim=1)
        assert sorted(set(assign.tolist())) == list(range(k))
        for j in range(k):
            centre = normalize_rows(pool[assign == j].double().mean(0, keepdim=True)).float()[0]
            assert torch.allclose(global_centroids[j], centre, atol=1e-5)
        expected = fedcc_kmeans(sets, k, seed=cfg.federation.seed, n_init=cfg.federation.kmeans_n_init)
        assert torch.allclose(global_centroids, expected, atol=1e-6)
    elif aggregator == "fedcc-maximin":
        # members of the pool; the first is the seeded pick, each next one the farthest from those picked
        idx = [int(torch.cdist(c[None], pool).argmin()) for c in global_centroids]
        assert torch.allclose(global_centroids, pool[idx], atol=1e-6)
        assert idx[0] == int(np.random.default_rng(cfg.federation.seed).integers(len(pool)))
        for i in range(1, k):
            dist = (1 - pool.double() @ pool[idx[:i]].double().T).min(dim=1).values
            dist[idx[:i]] = -1
            assert dist[idx[i]] >= dist.max() - 1e-9
    else:
        raise AssertionError(aggregator)


@pytest.mark.parametrize("aggregator", ["fedavg", "fedcc-kmeans", "fedcc-maximin"])
def test_simulator_job_end_to_end(runs, aggregator):
    cfg, sim = runs(aggregator)
    check_tiny_run(cfg, sim, aggregator, exported=aggregator == "fedavg")


def test_recipe_executes_in_flares_sim_env_as_the_exported_job(tiny_data_root, flare_cache, tmp_path):
    """The FLARE 2.9 recipe path, as hello-pt runs: ``FussRecipe(cfg).execute(SimEnv(...))``; the run passes
    every check of the exported job's run above, and its export is the folder ``fuss job export`` writes."""
    from nvflare.recipe.sim_env import SimEnv

    from fuss_flare.job import FussRecipe

    cfg = tiny_config(tiny_data_root, flare_cache, **{"partition": "site", "federation.aggregator": "fedcc-kmeans"})
    recipe = FussRecipe(cfg, "tiny_recipe", record_updates=True)
    assert recipe.site_names == ["s1", "s2", "s3"]
    started = time.perf_counter()
    recipe.execute(SimEnv(clients=recipe.site_names, workspace_root=str(tmp_path / "ws")))
    sim = Sim(0, "", tmp_path / "ws" / "tiny_recipe", time.perf_counter() - started)
    TIMINGS["tiny_recipe"] = sim.seconds
    check_tiny_run(cfg, sim, "fedcc-kmeans", exported=False)

    recipe.export(str(tmp_path / "recipe_export"))
    cli = export_job(cfg, tmp_path / "cli", "tiny_recipe", "--record-updates")
    exported = tmp_path / "recipe_export" / "tiny_recipe"
    files = sorted(p.relative_to(cli) for p in cli.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file())
    assert all((cli / f).read_bytes() == (exported / f).read_bytes() for f in files)


def check_tiny_run(cfg: FussConfig, sim: Sim, aggregator: str, exported: bool) -> None:
    """Everything one 2-round run of the tiny federation (sites s1, s2 train; s3 validates) must show."""
    assert sim.rc == 0, sim.log[-4000:]

    # model files: FLARE's persistor checkpoint and the runner-format final model, clean torch checkpoints
    state = sim.global_state()
    assert set(state) == MODEL_KEYS
    assert state["centroids"].shape == (3, 8)
    assert (sim.app / "FL_best_global_model.pt").is_file()
    final = torch.load(sim.app / "fuss_model.pt", weights_only=True)
    assert final["config"] == cfg.to_dict() and final["rounds"] == 2
    assert all(torch.equal(final["model"][k], state[k]) for k in MODEL_KEYS)
    ckpt = torch.load(sim.app / "fuss_checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 1 and all(torch.equal(ckpt["model"][k], state[k]) for k in MODEL_KEYS)

    # metrics.json: roles, per round per site, best, final; keyed by FLARE's client names (the partition's sites)
    m = sim.metrics
    assert {n: (s["is_training_site"], s["is_validation_site"], s["num_samples"]) for n, s in m["sites"].items()} == {
        "s1": (True, False, 6), "s2": (True, False, 5), "s3": (False, True, 0)}
    assert [r["round"] for r in m["rounds"]] == [0, 1]
    assert 0.0 <= m["initial"]["val_miou"] <= 1.0  # the initial model, validated in round 0
    for rec in m["rounds"]:
        assert rec["accepted"] == ["s1", "s2"] and rec["rejected"] == []
        for name, entry in rec["train"].items():
            # what crossed the wire (as received by the server): head + centroids + declared metadata only
            assert set(entry["meta_keys"]) <= DECLARED_META
            if name == "s3":  # the validation-only site: a zero-weight result, no parameters
                assert entry["param_keys"] == [] and entry["num_samples"] == 0
                continue
            assert set(entry["param_keys"]) == MODEL_KEYS
            assert entry["num_samples"] == {"s1": 6, "s2": 5}[name]
            assert entry["param_bytes"] == sum(v.numel() * 4 for v in state.values())
            assert entry["param_bytes"] < entry["bytes"] < entry["param_bytes"] + 4096
            assert {"loss_self", "loss_knn", "loss_random", "loss_centroids"} <= set(entry["metrics"])
        assert set(rec["train"]) == {"s1", "s2", "s3"}
        val = rec["validation"]["s3"]  # the global model after this round (validated in the next round / at the end)
        assert 0.0 <= val["miou"] <= 1.0 and len(val["per_class_iou"]) == 3 and val["num_images"] == 4
        assert rec["val_miou"] == pytest.approx(val["miou"])
    assert m["best"]["miou"] == pytest.approx(max(r["val_miou"] for r in m["rounds"]))
    assert m["final"]["round"] == 1 and m["final"]["val_miou"] == pytest.approx(m["rounds"][1]["val_miou"])
    if exported:  # the server's export of the final model: the file runs and is recorded
        assert m["final"]["export"]["format"] == "torchscript"
        segmenter = torch.jit.load(sim.app / "fuss_segmenter.pt")
        labels = segmenter(torch.zeros(40, 56, 3, dtype=torch.uint8))
        assert labels.shape == (40, 56) and labels.dtype == torch.int64 and 0 <= int(labels.min()) <= int(labels.max()) < 3
        assert json.loads((sim.app / "fuss_segmenter.json").read_text())["num_clusters"] == 3
    best = torch.load(sim.app / "FL_best_global_model.pt", weights_only=True)["model"]
    if m["best"]["round"] == 1:  # the persistor saved the validated model: the final one here
        assert all(torch.equal(best[k], state[k]) for k in MODEL_KEYS)

    # the aggregation rule, recomputed from the updates the server received in the last round
    updates = _updates(sim.received(1))
    assert [u[0] for u in updates] == ["s1", "s2"]  # the validation-only site sent no parameters
    for received in sim.received(1).values():
        assert set(received["params"]) == MODEL_KEYS
    _check_rule(aggregator, cfg, updates, state["centroids"])
    # the recorded centroid drift is that of the received updates
    drift = centroid_drift([ClientUpdate(n, h, c, k) for n, h, c, k in updates], cfg.federation, 3)
    assert m["rounds"][1]["drift"] == pytest.approx(drift) and set(drift) >= {"site_matched_mean", "fedavg_fedcc_min"}
    # head = FedAvg (Eq. 8) with weights N_k / N for every rule (switch W on)
    w = [6 / 11, 5 / 11]
    for key, value in updates[0][1].items():
        expected = sum(wi * u[1][key].double() for wi, u in zip(w, updates)).float()
        assert torch.allclose(state["head." + key], expected, atol=1e-6), key

    # metrics streamed through FLARE's tracking to the server's TensorBoard folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for folder in (sim.ws / "server" / "simulate_job" / "tb_events").iterdir():
        acc = EventAccumulator(str(folder))
        acc.Reload()
        tags[folder.name] = set(acc.Tags()["scalars"])
    assert {"train/loss_self", "train/loss_centroids", "train/clusters_used"} <= tags["s1"] & tags["s2"]
    assert {"val/miou", "val/pixel_acc"} <= tags["s3"]
    server = next(v for k, v in tags.items() if k not in ("s1", "s2", "s3"))
    assert {"global/val_miou", "global/val_pixel_acc", "wire/s1_bytes", "global/drift_site_matched_mean"} <= server


def test_run_metrics_arrive_in_mlflow(runs, monkeypatch):
    """``fuss job export --mlflow``: FLARE's MLflowReceiver writes, beside TensorBoard, one MLflow run per
    site into a local SQLite store (no server, no network): each training site's losses and the validation
    site's scores of every round's global model; nothing beyond the declared tags."""
    mlflow = pytest.importorskip("mlflow")
    from fuss_components.wire import ANALYTICS_TAGS

    _, sim = runs("fedcc-maximin")
    assert sim.rc == 0, sim.log[-4000:]
    (store,) = list(sim.ws.rglob("mlflow.db"))
    monkeypatch.chdir(sim.ws)
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    experiment = mlflow.get_experiment_by_name("tiny_fedcc_maximin")
    found = mlflow.search_runs(experiment_ids=[experiment.experiment_id], output_format="list")
    client = mlflow.tracking.MlflowClient()
    by_site = {}
    for run in found:
        site = (run.info.run_name or "").split("-")[0]  # FLARE names a site's run "<site>-<job>-..."
        by_site[site] = {key: [m.value for m in client.get_metric_history(run.info.run_id, key)]
                         for key in run.data.metrics}
    assert set(by_site) == {"s1", "s2", "s3"}, {r.info.run_name: r.data.tags for r in found}
    rounds = sim.metrics["rounds"]
    # the validation site's mIoU of every round's global model, as metrics.json has them
    assert by_site["s3"]["val/miou"] == pytest.approx([r["val_miou"] for r in rounds])
    for site in ("s1", "s2"):
        assert {"train/loss_self", "train/loss_centroids"} <= set(by_site[site])
        assert len(by_site[site]["train/loss_self"]) == len(rounds)
    for site in ("s1", "s2", "s3"):  # a site's run holds only the tags its forwarder lets through
        assert set(by_site[site]) <= set(ANALYTICS_TAGS), by_site[site].keys()


def test_parity_with_in_process_runner(runs, tmp_path):
    """`fuss train --mode federated` (runner.run_federated) and the FLARE simulator: same global model."""
    from fuss_components.checkpoint import read_model_file
    from fuss_components.runner import run_federated
    from fuss_components.backbones import _architecture

    cfg, sim = runs("fedcc-kmeans")
    assert sim.rc == 0, sim.log[-4000:]
    _architecture.cache_clear()  # like a fresh process: the initial global model must not depend on it
    result = run_federated(cfg, tmp_path / "ref", progress=False)
    ref, _, _ = read_model_file(tmp_path / "ref" / "model.pt")
    flare = sim.global_state()
    for key in MODEL_KEYS:
        assert torch.allclose(ref[key], flare[key], atol=1e-5), (key, (ref[key] - flare[key]).abs().max())
    assert sim.metrics["final"]["val_miou"] == pytest.approx(result["rounds"][-1]["miou"], abs=1e-6)


def test_hostile_peer_updates_are_rejected_and_rounds_proceed(tmp_path, flare_cache):
    """s2 runs a hostile job's code that flips its head and leaks content, on a site whose result filter still runs;
    s4 and s5 are hostile peers without filters: s4 claims 1,000 images after declaring 5, s5 sends NaN centroids
    and one centroid too many. With min_clients=1 both rounds aggregate s1 alone; every rejection names the site and its reason, the
    leak never reaches the server, and the global model is s1's update."""
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 6, "s2": 5, "s4": 5, "s5": 5, "s3": 4})
    cfg = tiny_config(root, flare_cache, **{"partition": "site", "federation.min_clients": 1})
    job = export_job(cfg, tmp_path, "tiny_hostile", "--record-updates")
    add_hostile_app(job, "app_hostile_code", ["s2"], {"s2": ["flip", "leak"]}, keep_filters=True)
    add_hostile_app(job, "app_hostile_peer", ["s4", "s5"], {"s4": ["inflate"], "s5": ["nan", "extra_centroid"]},
                    keep_filters=False)
    sim = simulate(job, tmp_path / "ws")
    assert sim.rc == 0, sim.log[-4000:]
    m = sim.metrics
    assert len(m["rounds"]) == 2
    for rec in m["rounds"]:
        assert rec["accepted"] == ["s1"]
        reasons = dict(rec["rejected"])
        assert set(reasons) == {"s2", "s4", "s5"}, reasons
        assert "max_relative_change" in reasons["s2"] and "s2" in reasons["s2"]
        assert "1000" in reasons["s4"] and "declared" in reasons["s4"]
        assert "s5" in reasons["s5"]
        # the leak was dropped by s2's own result filter before it left the site
        assert set(rec["train"]["s2"]["param_keys"]) == MODEL_KEYS
        assert "image_ids" not in rec["train"]["s2"]["meta_keys"]
        assert "path" not in rec["train"]["s2"]["metrics"]
        received = sim.received(rec["round"])
        assert set(received["s2"]["params"]) == MODEL_KEYS
    logs = sim.all_logs()
    for site in ("s2", "s4", "s5"):
        assert f"rejected the update of {site}" in logs
    assert "backbone.blocks.0.attn.qkv.weight" in logs and "dropped" in logs  # the site's audit of the leak
    # the global model of the last round is the aggregate of s1's update alone
    s1 = received["s1"]["params"]
    state = sim.global_state()
    assert torch.allclose(state["head.linear.weight"], s1["head.linear.weight"], atol=1e-6)


@pytest.mark.parametrize("fault", ["spoof:s1", "impersonate:s1"])
def test_spoofed_site_name_is_rejected(tmp_path, flare_cache, fault):
    """A hostile peer (no filters) declares another site's name in its meta, or also rewrites the identity of the
    FLARE context its result carries: the server keys results by the client of the session that delivered them,
    rejects the spoofer naming both names, and the honest site's update is kept."""
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 6, "s2": 5, "s3": 4})
    cfg = tiny_config(root, flare_cache, **{"partition": "site", "federation.min_clients": 1,
                                            "federation.rounds": 1})
    job = export_job(cfg, tmp_path, "tiny_spoof", "--record-updates")
    add_hostile_app(job, "app_spoof", ["s2"], {"s2": [fault]}, keep_filters=False)
    sim = simulate(job, tmp_path / "ws")
    assert sim.rc == 0, sim.log[-4000:]
    (rec,) = sim.metrics["rounds"]
    assert rec["accepted"] == ["s1"]
    reasons = dict(rec["rejected"])
    assert set(reasons) == {"s2"} and "'s1'" in reasons["s2"] and "'s2'" in reasons["s2"]
    if fault.startswith("impersonate:"):
        assert "session of 's2' but carries the identity 's1'" in reasons["s2"]


def test_missing_data_root_fails_naming_site_and_path(tmp_path, flare_cache):
    missing = tmp_path / "no_such_data_root"
    cfg = tiny_config(missing, flare_cache, partition="site")
    job = export_job(cfg, tmp_path, "tiny_missing")
    sim = simulate(job, tmp_path / "ws", n=2, timeout=180)
    assert sim.rc != 0 or not (sim.app / "fuss_model.pt").exists()
    logs = sim.all_logs()
    assert "DataError" in logs
    lines = [line for line in logs.splitlines() if str(missing) in line and "site-1" in line]
    assert lines, logs[-4000:]
    assert not (sim.app / "fuss_model.pt").exists()


# the hostile job of the disclosure issue: allowed hyperparameters only, which made a site send copies of its codes
HOSTILE_DISCLOSURE = {"train.num_clusters": 2000, "train.dim": 384, "train.dropout": 0.0,
                      "train.reseed_dead_every": 1, "train.lr_head": 1e-9, "train.lr_centroids": 1e-9,
                      "federation.local_steps": 1}


def test_hostile_job_is_refused_by_the_sites_disclosure_policy(tiny_data_root, tmp_path):
    """The job, submitted as a hostile lead would, to sites holding the default disclosure policy (the
    ``local/fuss_policy.json`` that ``fuss_flare.site_policy`` installs; the test suite's permissive variable is
    removed): every site refuses it at the census, before extracting anything, naming the bounds it breaks; no
    model comes out."""
    cfg = tiny_config(tiny_data_root, tmp_path / "cache", partition="site").with_overrides(HOSTILE_DISCLOSURE)
    job = export_job(cfg, tmp_path, "tiny_hostile_disclosure", "--record-updates")
    sim = simulate(job, tmp_path / "ws", env={"FUSS_SITE_POLICY": ""}, timeout=180)
    logs = sim.all_logs()
    assert sim.rc != 0 or not (sim.app / "fuss_model.pt").exists()
    for site in ("s1", "s2"):
        assert f"site '{site}' refuses the job" in logs, logs[-4000:]
    assert "train.num_clusters=2000 exceeds the site's max_clusters=64" in logs
    assert "answered site_info, fewer than" in logs  # the server stops the job at the census
    assert not list((tmp_path / "cache").rglob("*.npy")) and not (sim.app / "received").exists()


@pytest.mark.realdata
def test_hostile_job_on_a_site_that_allows_its_clusters_sends_no_patch_code(shared, tmp_path):
    """A camvid hospital (sequence 0006R0, 101 images) whose policy allows 2,000 clusters (and the widest head
    it permits, D = D'/2 = 192) runs the hostile job for real in the simulator. What the server receives is
    checked against every patch code of the site under the head sent with it: no centroid within cosine 0.99."""
    from fuss_components.cache import FeatureCache
    from fuss_components.datasets import open_dataset
    from fuss_components.disclosure import DisclosurePolicy
    from fuss_components.head import FussModel
    from fuss_components.partition import Partition

    ds = open_dataset("camvid", shared / "data")
    Partition("camvid", "site", 0, 11, {"0006R0": ds.ids(site="0006R0")}, {}, {}).save(tmp_path / "partition.json")
    cfg = FussConfig.from_dict({"partition": str(tmp_path / "partition.json")}).with_overrides(
        {**HOSTILE_DISCLOSURE, "train.dim": 192, "federation.rounds": 1})
    job = export_job(cfg, tmp_path, "camvid_hostile_disclosure", "--record-updates")
    (tmp_path / "ws" / "local").mkdir(parents=True)
    # a site that allows 2,000 clusters also bounds how close a sent mean may lie to one of its codes: 50 codes of
    # 5 consecutive frames of a static scene are near-identical, and their mean came within 0.9906 of one
    policy = DisclosurePolicy(max_clusters=2000, max_dim=192, min_images=1, max_code_cosine=0.98)
    (tmp_path / "ws" / "local" / "fuss_policy.json").write_text(json.dumps(policy.to_dict()))
    sim = simulate(job, tmp_path / "ws", env={"FUSS_SITE_POLICY": ""}, timeout=900)
    assert sim.rc == 0, sim.log[-3000:]
    (entry,) = sim.received(0).values()
    state = entry["params"]
    assert state["centroids"].shape == (2000, 192)
    model = FussModel(384, 192, 2000, 0.0)
    model.load_state_dict(state)
    cache = FeatureCache(cfg, "camvid")
    centroids = torch.nn.functional.normalize(state["centroids"], dim=1)
    best = torch.full((2000,), -1.0)
    with torch.no_grad():
        for image_id in ds.ids(site="0006R0"):
            views = torch.from_numpy(cache._load("train", image_id)).float()
            codes = torch.nn.functional.normalize(model(views).flatten(2).transpose(1, 2).flatten(0, 1), dim=1)
            best = torch.maximum(best, (centroids @ codes.T).max(dim=1).values)
    assert float(best.max()) < 0.99, float(best.max())
    assert "centroids sent as means of >= 50 patch codes" in sim.all_logs()


@pytest.mark.slow
def test_resume_from_checkpoint_continues_the_run(runs, tmp_path):
    """A 3-round job resumed from the 2-round k-means run's checkpoint runs only round 2 and ends where an
    uninterrupted 3-round in-process federation ends."""
    from fuss_components.checkpoint import read_model_file
    from fuss_components.runner import run_federated
    from fuss_components.site import build_model

    cfg2, first = runs("fedcc-kmeans")
    assert first.rc == 0, first.log[-4000:]
    cfg3 = cfg2.with_overrides({"federation.rounds": 3})
    job = export_job(cfg3, tmp_path, "tiny_resume", "--resume-from", str(first.app / "fuss_checkpoint.pt"))
    sim = simulate(job, tmp_path / "ws")
    assert sim.rc == 0, sim.log[-4000:]
    m = sim.metrics
    assert [r["round"] for r in m["rounds"]] == [0, 1, 2] and m["final"]["round"] == 2
    assert "Round 0 started" not in sim.log and "Round 2 started" in sim.log
    build_model(cfg3)  # same work-around as in test_parity_with_in_process_runner
    run_federated(cfg3, tmp_path / "ref", progress=False)
    ref, _, _ = read_model_file(tmp_path / "ref" / "model.pt")
    state = sim.global_state()
    for key in MODEL_KEYS:
        assert torch.allclose(ref[key], state[key], atol=1e-5), key


@pytest.mark.realdata
def test_real_camvid_simulator_matches_in_process_runner(shared, tmp_path):
    """The real backbone on a small CamVid federation (3 sequences x 6 frames, 4 Seq05VD frames for validation,
    2 rounds x 4 steps, FedCC-kmeans): the FLARE simulator and `run_federated` give the same global model."""
    from fuss_components.datasets import open_dataset
    from fuss_components.partition import Partition
    from fuss_components.checkpoint import read_model_file
    from fuss_components.runner import run_federated

    ds = open_dataset("camvid", shared / "data")
    clients = {s: ds.ids(site=s)[::17][:6] for s in ("0001TP", "0006R0", "0016E5")}
    Partition("camvid", "site", 0, 11, clients, {"Seq05VD": ds.ids(site="Seq05VD")[::40][:4]}, {}).save(
        tmp_path / "partition.json")
    cfg = FussConfig.from_dict({"partition": str(tmp_path / "partition.json"), "cache_dir": str(tmp_path / "cache"),
                                "federation": {"rounds": 2, "local_steps": 4}})
    sim = simulate(export_job(cfg, tmp_path, "real_camvid"), tmp_path / "ws")
    assert sim.rc == 0, sim.log[-3000:]
    flare_state, saved_cfg, _ = read_model_file(sim.app / "fuss_model.pt")
    assert FussConfig.from_dict(saved_cfg).partition == cfg.partition
    # the reference with the thread count of each simulated site (its cores over the 4 sites): Adam turns the
    # last-bit differences of another summation order into learning-rate-sized steps on near-zero gradients
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 4))
    try:
        reference = run_federated(cfg, tmp_path / "inproc", progress=False)
    finally:
        torch.set_num_threads(threads)
    local_state, _, _ = read_model_file(tmp_path / "inproc" / "model.pt")
    for key, value in local_state.items():
        torch.testing.assert_close(flare_state[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert sim.metrics["rounds"][-1]["val_miou"] == pytest.approx(reference["rounds"][-1]["miou"], abs=1e-6)
    assert 0.05 < reference["rounds"][-1]["miou"] < 1
