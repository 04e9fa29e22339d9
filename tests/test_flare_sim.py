"""End to end through the real NVIDIA FLARE simulator (`nvflare simulator JOB -w WS -n N -t N`, a subprocess) on the
tiny synthetic dataset with the tiny random backbone: 2 training sites (s1, s2) + 1 validation site (s3), 2 rounds.

One simulator run per aggregator (about 30 s each here); every assertion about a run is made on the same run:
completion, model files, the aggregation rule recomputed from what the server received, metrics streamed
(TensorBoard files + metrics.json), and the wire content. Plus: a fault run (NaN / wrong number of centroids /
undeclared content injected by a test-only hook), a missing data root, and parity with the in-process runner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_dataset, tiny_config
from fuss_components.aggregation import average_centroids, fedavg_weights, fedcc_kmeans, normalize_rows
from fuss_components.config import FussConfig
from fuss_components.head import split_state
from fuss_components.simulator import run_simulator

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
DECLARED_META = {"num_samples", "site", "initial_metrics"}  # initial_metrics = FLModel's metrics slot
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


def simulate(job: Path, ws: Path, n: int, env: dict | None = None, timeout: int = 300) -> Sim:
    """The real simulator through fuss_components.simulator (which restarts it after FLARE's start-up races)."""
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
            job = export_job(cfg, tmp, f"tiny_{aggregator.replace('-', '_')}", "--record-updates")
            cache[aggregator] = (cfg, simulate(job, tmp / "ws", n=3))
        return cache[aggregator]

    yield get
    if TIMINGS:
        print("\nsimulator wall seconds:", {k: round(v, 1) for k, v in TIMINGS.items()})


def _updates(received: dict) -> list[tuple[str, dict, torch.Tensor, int]]:
    """(site, head, centroids, N_k) of every received update, sorted by partition site like the aggregator."""
    out = []
    for entry in received.values():
        meta = json.loads(entry["meta"])
        head, centroids = split_state(entry["params"])
        out.append((meta["site"], head, centroids, meta["num_samples"]))
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

    # metrics.json: roles, per round per site, best, final
    m = sim.metrics
    assert {n: (s["site"], s["is_training_site"], s["is_validation_site"]) for n, s in m["sites"].items()} == {
        "site-1": ("s1", True, False), "site-2": ("s2", True, False), "site-3": ("s3", False, True)}
    assert [r["round"] for r in m["rounds"]] == [0, 1]
    for rec in m["rounds"]:
        assert rec["accepted"] == ["s1", "s2"] and rec["rejected"] == []
        assert set(rec["train"]) == {"site-1", "site-2"}  # the validation-only site never trains
        for name, entry in rec["train"].items():
            # what crossed the wire (as received by the server): head + centroids + declared metadata only
            assert set(entry["param_keys"]) == MODEL_KEYS
            assert set(entry["meta_keys"]) <= DECLARED_META
            assert entry["num_samples"] == {"site-1": 6, "site-2": 5}[name]
            assert entry["param_bytes"] == sum(v.numel() * 4 for v in state.values())
            assert entry["param_bytes"] < entry["bytes"] < entry["param_bytes"] + 4096
            assert {"loss_self", "loss_knn", "loss_random", "loss_centroids"} <= set(entry["metrics"])
        val = rec["validation"]["site-3"]
        assert 0.0 <= val["miou"] <= 1.0 and len(val["per_class_iou"]) == 3 and val["num_images"] == 4
        assert rec["val_miou"] == pytest.approx(val["miou"])
    assert m["best"]["miou"] == pytest.approx(max(r["val_miou"] for r in m["rounds"]))
    assert m["final"]["round"] == 1 and m["final"]["val_miou"] == pytest.approx(m["rounds"][1]["val_miou"])
    assert "error" not in m

    # the aggregation rule, recomputed from the updates the server received in the last round
    updates = _updates(sim.received(1))
    assert [u[0] for u in updates] == ["s1", "s2"]
    for received in sim.received(1).values():
        assert set(received["params"]) == MODEL_KEYS
    _check_rule(aggregator, cfg, updates, state["centroids"])
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
    assert {"train/loss_self", "train/loss_centroids", "train/clusters_used"} <= tags["site-1"] & tags["site-2"]
    assert {"val/miou", "val/pixel_acc"} <= tags["site-3"]
    server = next(v for k, v in tags.items() if not k.startswith("site-"))
    assert {"global/val_miou", "global/val_pixel_acc", "wire/site-1_bytes"} <= server


def test_parity_with_in_process_runner(runs, tmp_path):
    """`fuss train --mode federated` (runner.run_federated) and the FLARE simulator: same global model."""
    from fuss_components.runner import load_model, run_federated
    from fuss_components.backbones import _architecture

    cfg, sim = runs("fedcc-kmeans")
    assert sim.rc == 0, sim.log[-4000:]
    _architecture.cache_clear()  # like a fresh process: the initial global model must not depend on it
    result = run_federated(cfg, tmp_path / "ref", progress=False)
    ref, _ = load_model(tmp_path / "ref" / "model.pt")
    flare = sim.global_state()
    for key in MODEL_KEYS:
        assert torch.allclose(ref[key], flare[key], atol=1e-5), (key, (ref[key] - flare[key]).abs().max())
    assert sim.metrics["final"]["val_miou"] == pytest.approx(result["rounds"][-1]["miou"], abs=1e-6)


def test_bad_updates_are_rejected_and_rounds_proceed(tmp_path, flare_cache):
    """site-2 sends NaN centroids plus undeclared content, site-3 one centroid too many; with min_clients=1 both
    rounds aggregate site-1 alone, each rejection logged with its reason; the filter drops the undeclared content."""
    root = make_tiny_dataset(tmp_path / "data", sites={"s1": 6, "s2": 5, "s4": 5, "s3": 4})
    cfg = tiny_config(root, flare_cache, **{"partition": "site", "federation.min_clients": 1})
    job = export_job(cfg, tmp_path, "tiny_faults", "--record-updates")
    sim = simulate(job, tmp_path / "ws", n=4,
                   env={"FUSS_TEST_CORRUPT_UPDATE": "site-2:nan+leak,site-3:extra_centroid"})
    assert sim.rc == 0, sim.log[-4000:]
    m = sim.metrics
    assert {n: s["site"] for n, s in m["sites"].items()} == {"site-1": "s1", "site-2": "s2", "site-3": "s4",
                                                           "site-4": "s3"}
    assert len(m["rounds"]) == 2
    for rec in m["rounds"]:
        assert rec["accepted"] == ["s1"]
        reasons = dict(rec["rejected"])
        assert set(reasons) == {"s2", "s4"}
        assert "NaN" in reasons["s2"] and "s2" in reasons["s2"]
        assert "(4, 8)" in reasons["s4"] and "(3, 8)" in reasons["s4"]
        # undeclared parameter / meta never reached the server (dropped by FussResultFilter on site-2)
        assert set(rec["train"]["site-2"]["param_keys"]) == MODEL_KEYS
        assert "image_ids" not in rec["train"]["site-2"]["meta_keys"]
        assert rec["train"]["site-3"]["param_shapes"]["centroids"] == [4, 8]
        r = rec["round"]
        received = sim.received(r)
        assert all(set(e["params"]) == MODEL_KEYS for e in received.values())
    logs = sim.all_logs()
    assert "rejected the update of s2" in logs and "rejected the update of s4" in logs
    assert "FussResultFilter: not sent" in logs and "backbone.blocks.0.attn.qkv.weight" in logs
    # the global model of the last round is the aggregate of site-1's update alone
    s1 = received["site-1"]["params"]
    state = sim.global_state()
    assert torch.allclose(state["head.linear.weight"], s1["head.linear.weight"], atol=1e-6)


def test_missing_data_root_fails_naming_site_and_path(tmp_path, flare_cache):
    missing = tmp_path / "no_such_data_root"
    cfg = tiny_config(missing, flare_cache, partition="site")
    job = export_job(cfg, tmp_path, "tiny_missing")
    sim = simulate(job, tmp_path / "ws", n=2, timeout=180)
    assert sim.rc != 0
    logs = sim.all_logs()
    assert "DataError" in logs
    lines = [line for line in logs.splitlines() if str(missing) in line and "site-1" in line]
    assert lines, logs[-4000:]
    assert not (sim.app / "fuss_model.pt").exists()


@pytest.mark.slow
def test_resume_from_checkpoint_continues_the_run(runs, tmp_path):
    """A 3-round job resumed from the 2-round k-means run's checkpoint runs only round 2 and ends where an
    uninterrupted 3-round in-process federation ends."""
    from fuss_components.runner import load_model, run_federated
    from fuss_components.site import build_model

    cfg2, first = runs("fedcc-kmeans")
    assert first.rc == 0, first.log[-4000:]
    cfg3 = cfg2.with_overrides({"federation.rounds": 3})
    job = export_job(cfg3, tmp_path, "tiny_resume", "--resume-from", str(first.app / "fuss_checkpoint.pt"))
    sim = simulate(job, tmp_path / "ws", n=3)
    assert sim.rc == 0, sim.log[-4000:]
    m = sim.metrics
    assert [r["round"] for r in m["rounds"]] == [0, 1, 2] and m["final"]["round"] == 2
    assert "Round 0 started" not in sim.log and "Round 2 started" in sim.log
    build_model(cfg3)  # same work-around as in test_parity_with_in_process_runner
    run_federated(cfg3, tmp_path / "ref", progress=False)
    ref, _ = load_model(tmp_path / "ref" / "model.pt")
    state = sim.global_state()
    for key in MODEL_KEYS:
        assert torch.allclose(ref[key], state[key], atol=1e-5), key


@pytest.mark.realdata
def test_real_camvid_simulator_matches_in_process_runner(shared, tmp_path):
    """The real backbone on a small CamVid federation (3 sequences x 6 frames, 4 Seq05VD frames for validation,
    2 rounds x 4 steps, FedCC-kmeans): the FLARE simulator and `run_federated` give the same global model."""
    from fuss_components.datasets import open_dataset
    from fuss_components.partition import Partition
    from fuss_components.runner import load_model, run_federated

    ds = open_dataset("camvid", shared / "data")
    clients = {s: ds.ids(site=s)[::17][:6] for s in ("0001TP", "0006R0", "0016E5")}
    Partition("camvid", "site", 0, 11, clients, {"Seq05VD": ds.ids(site="Seq05VD")[::40][:4]}, {}).save(
        tmp_path / "partition.json")
    cfg = FussConfig.from_dict({"partition": str(tmp_path / "partition.json"), "cache_dir": str(tmp_path / "cache"),
                                "federation": {"rounds": 2, "local_steps": 4}})
    sim = simulate(export_job(cfg, tmp_path, "real_camvid"), tmp_path / "ws", n=4)
    assert sim.rc == 0, sim.log[-3000:]
    flare_state, saved_cfg = load_model(sim.app / "fuss_model.pt")
    assert FussConfig.from_dict(saved_cfg).partition == cfg.partition
    reference = run_federated(cfg, tmp_path / "inproc", progress=False)
    local_state, _ = load_model(tmp_path / "inproc" / "model.pt")
    for key, value in local_state.items():
        torch.testing.assert_close(flare_state[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert sim.metrics["rounds"][-1]["val_miou"] == pytest.approx(reference["rounds"][-1]["miou"], abs=1e-6)
    assert 0.05 < reference["rounds"][-1]["miou"] < 1
