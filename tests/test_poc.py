"""FUSS on real NVIDIA FLARE federations on loopback (``poc/fuss_poc.py``), not the simulator.

Two federations:

* ``hospitals``: the production path. ``nvflare provision`` of ``poc/project.yml`` (server, hospital-a/b/c, a
  project admin, org admins, a lead), kits pointed at localhost, ``poc/privacy.json`` installed as every hospital's
  site policy, each hospital started from its own kit with its own data folder / partition entry / config, on the
  tiny synthetic dataset with the tiny random backbone (fast). Tests: loopback only + admin console; a job with
  the centroid privacy filter (audit lines of every filter, and the values the server received); a job asking
  for a scope the sites do not define; a site started with a wrong data path; a site killed mid-job with and
  without enough sites left; and finally that stopping leaves no process and no port behind.
* ``test_camvid_poc_end_to_end``: the acceptance run. ``poc/run.sh``'s ``run`` in POC mode (``nvflare poc
  prepare``) on camvid, 3 sites, 2 rounds, real backbone, driven through the Session API; the admin console is
  driven against the running POC; the downloaded global model is loaded by ``fuss evaluate``.

Every federation is stopped in a ``finally`` (fixture teardown or the command's own), and the last test of each
asserts that no process of the run and none of its ports is left.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TEST_POLICY, make_tiny_dataset, tiny_config
from fuss_components.config import FussConfig
from fuss_components.partition import Partition

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "poc"))
import fuss_poc  # noqa: E402

pytestmark = pytest.mark.flare

HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]
HEARTBEAT_TIMEOUT = 20.0  # server drops a silent site after this (sites beat every 10 s)
FAST_DEAD_SITE = ["--server-param", "dead_client_grace_period=0", "--server-param", "dead_client_check_lead_time=5"]
MODEL_KEYS = {"centroids", "head.linear.weight", "head.linear.bias", "head.nonlinear.0.weight",
              "head.nonlinear.0.bias", "head.nonlinear.2.weight", "head.nonlinear.2.bias"}
CAMVID_SITES = ("0001TP", "0006R0", "site-0016E5")  # FLARE reads a client named 0016E5 as the number 1.6e6
TIMINGS: dict[str, float] = {}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hospital_data(tmp_path_factory):
    """Tiny dataset with one site per hospital; hospital-c also holds 3 validation images. Every hospital gets
    its own data folder, partition entry and fuss_site.json (the shared feature cache is keyed, so safe)."""
    tmp = tmp_path_factory.mktemp("hospital_data")
    root = make_tiny_dataset(tmp / "shared", sites={"hospital-a": 6, "hospital-b": 5, "hospital-c": 7})
    items = json.loads((root / "tiny" / "meta.json").read_text())["items"]
    ids = {h: sorted(it["id"] for it in items if it["site"] == h) for h in HOSPITALS}
    part = Partition(dataset="tiny", strategy="site", seed=0, num_classes=3,
                     clients={"hospital-a": ids["hospital-a"], "hospital-b": ids["hospital-b"],
                              "hospital-c": ids["hospital-c"][:4]},
                     validation={"hospital-c": ids["hospital-c"][4:]})
    manifest = part.save(tmp / "partition.json")
    cache = tmp / "cache"
    # the backbone is a hospital's own choice too (site_owned): here the tiny ViT the job's configuration names
    sites = {h: fuss_poc.make_site_data(part, h, root / "tiny", tmp / "sites" / h, cache,
                                        overrides={"backbone.weights": "random"}) for h in HOSPITALS}
    # the job: the tiny configuration, with no site path in it (each site has its own)
    cfg = tiny_config(root, cache, partition=str(manifest)).with_overrides({"data.root": None, "cache_dir": None})
    return {"cfg": cfg, "sites": sites, "partition": part, "tmp": tmp}


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory, hospital_data):
    """The provisioned hospital federation, running for the whole module; always stopped at the end."""
    fed = fuss_poc.Federation(tmp_path_factory.mktemp("hospitals"), HOSPITALS, mode="prod",
                              project=fuss_poc._load_yaml(fuss_poc.PROJECT_TEMPLATE),
                              heartbeat_timeout=HEARTBEAT_TIMEOUT)
    started = time.perf_counter()
    try:
        fed.prepare()
        fed.install_privacy_policy(fuss_poc.PRIVACY_EXAMPLE)
        fed.start({h: _hospital_env(fed, h, hospital_data) for h in HOSPITALS})
        TIMINGS["provision+start"] = time.perf_counter() - started
        yield fed
    finally:
        fed.stop()
        if TIMINGS:
            print("\nPOC wall seconds:", {k: round(v, 1) for k, v in TIMINGS.items()})


def _hospital_env(fed, site: str, hospital_data) -> dict[str, str]:
    """A hospital's start environment: its FUSS site configuration, and its kit's own disclosure policy (written
    by ``site_policy --no-byoc``: the keys it owns) with the test bounds that let the tiny sites train."""
    kit_policy = json.loads((fed.kits[site] / "local" / "fuss_policy.json").read_text())
    policy = hospital_data["tmp"] / f"{site}_policy.json"
    policy.write_text(json.dumps({**TEST_POLICY, "site_owned": kit_policy["site_owned"]}))
    return {**hospital_data["sites"][site].env(), "FUSS_SITE_POLICY": str(policy)}


def _job(hospital_data, tmp: Path, name: str, *extra: str, **overrides) -> Path:
    cfg = hospital_data["cfg"].with_overrides(overrides) if overrides else hospital_data["cfg"]
    return fuss_poc.export_job(cfg, tmp, name, *extra)


def _run_job(fed, job: Path, dest: Path, timeout: float = 300, during=None) -> tuple[str, dict, Path]:
    """Submit, follow (optionally calling ``during(job_id)`` once it runs), download and collect."""
    started = time.perf_counter()
    job_id = fed.submit(job)
    if during is not None:
        during(job_id)
    meta = fed.wait_for_job(job_id, timeout)
    TIMINGS[job.name] = time.perf_counter() - started
    result = fed.download(job_id, dest)
    fed.collect(job_id, dest / job_id)
    return job_id, meta, result


def _watch_stats(fed, job_id: str, snapshots: list, timeout: float = 240.0) -> None:
    """``show_stats`` of the server and the clients, twice a second, until the job finishes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (fed.session().get_job_meta(job_id).get("status") or "").startswith("FINISHED"):
            return
        try:
            snapshots.append((fed.session().show_stats(job_id, "server"), fed.session().show_stats(job_id, "client")))
        except Exception:  # the job is not running yet (or any more)
            pass
        time.sleep(0.5)


def _groups(tree, name: str) -> list[dict]:
    """Every value stored under key ``name`` anywhere in a nested reply."""
    found = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == name and isinstance(value, dict):
                found.append(value)
            else:
                found.extend(_groups(value, name))
    elif isinstance(tree, list):
        for value in tree:
            found.extend(_groups(value, name))
    return found


def _server_log(result: Path) -> str:
    """The server's log of a job, from the downloaded job (the server moves it to its job store at the end)."""
    return "".join(p.read_text(errors="replace") for p in sorted(result.rglob("workspace/log.txt")))


def _site_log(fed, site: str, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (fed.kits[site] / job_id).rglob("log*.txt"))


def _app_server(result: Path) -> Path:
    (metrics,) = result.rglob("app_server/metrics.json")
    return metrics.parent


# ---------------------------------------------------------------------------------------------- projects


def test_every_site_of_a_project_is_its_own_org():
    """A project's sites never share an org (an org_admin operates the sites of its org): the hospitals keep theirs,
    sites added for a run (e.g. camvid's sequences) each get one of their own."""
    project = fuss_poc._load_yaml(fuss_poc.PROJECT_TEMPLATE)
    out = fuss_poc.project_with_ports(project, 8100, 8101, sites=["hospital-a", "0001TP", "site-0016E5"])
    orgs = {p["name"]: p["org"] for p in out["participants"] if p["type"] == "client"}
    assert orgs == {"hospital-a": "hospital_a", "0001TP": "0001TP", "site-0016E5": "site_0016E5"}
    server = next(p for p in out["participants"] if p["type"] == "server")
    assert (server["fed_learn_port"], server["admin_port"]) == (8100, 8101)


def test_sites_on_one_machine_each_get_their_own_gpu(tmp_path):
    sites = {name: fuss_poc.SiteData(name, tmp_path, tmp_path, tmp_path / "p.json", tmp_path / f"{name}.json")
             for name in ("a", "b", "c")}
    envs = fuss_poc.site_environments(sites, "0, 1")
    assert [envs[n]["CUDA_VISIBLE_DEVICES"] for n in sites] == ["0", "1", "0"]
    assert envs["b"][fuss_poc.SITE_CONFIG_ENV] == str(tmp_path / "b.json")
    assert all("CUDA_VISIBLE_DEVICES" not in env for env in fuss_poc.site_environments(sites, None).values())


# ---------------------------------------------------------------------------------------------- provisioned kits


def test_provisioned_kits_run_on_loopback_and_answer_the_admin_console(hospitals):
    fed = hospitals
    assert fed.connected_sites() == HOSPITALS
    # every socket the federation listens on is on 127.0.0.1 (never 0.0.0.0)
    listening = fuss_poc.listening_sockets(fed.run_id)
    assert {port for _, _, port in listening} >= {fed.fl_port, fed.admin_port}
    assert {addr for _, addr, _ in listening} == {"127.0.0.1"}, listening
    # the admin console, non-interactively: commands on stdin, answers on stdout
    out = fed.admin_console(["check_status server", "check_status client", "list_jobs"])
    assert "Engine status" in out or "engine status" in out.lower(), out[-3000:]
    for site in HOSPITALS:
        assert site in out, out[-3000:]
    # the lead researcher's kit works too (lead and project_admin may submit FUSS jobs)
    lead = next(n for n, role in fed.admins.items() if role == "lead")
    assert "hospital-a" in fed.admin_console(["check_status client"], user=lead)
    # and the nvflare command line, as docs/deployment.md shows it
    cli = subprocess.run([str(Path(sys.executable).with_name("nvflare")), "job", "list", "--startup-kit",
                          str(fed.kits[fed.admin])], env=fed.base_env(), capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]


def test_job_with_site_policy_and_centroid_privacy(hospitals, hospital_data, tmp_path):
    """Every filter is applied (audit lines on every site), and what the server received is exactly the clipped
    and noised centroids plus the untouched head of what the site computed (recomputed here in-process)."""
    from fuss_components.head import split_state
    from fuss_components.privacy import account, clip_rows
    from fuss_components.site import Site, build_model, init_global_state

    fed, clip, sigma = hospitals, 0.5, 0.5
    job = _job(hospital_data, tmp_path, "tiny_private", "--record-updates", "--centroid-clip", str(clip),
               "--centroid-noise", str(sigma))
    snapshots: list[tuple[dict, dict]] = []
    job_id, meta, result = _run_job(fed, job, tmp_path / "result", during=lambda j: _watch_stats(fed, j, snapshots))
    assert meta["status"] == "FINISHED:COMPLETED", _server_log(result)[-4000:]
    app = _app_server(result)
    metrics = json.loads((app / "metrics.json").read_text())
    assert [r["accepted"] for r in metrics["rounds"]] == [HOSPITALS, HOSPITALS]

    # the admin console while it ran: show_stats <job> server / client (FLARE's InfoCollector)
    server = [s for snap, _ in snapshots for s in _groups(snap, "FussRecorder") if s.get("rounds_done")]
    assert server, f"no show_stats snapshot after a finished round: {snapshots[-1:]}"
    first = server[0]
    assert first["last_round"]["accepted"] == HOSPITALS and first["last_round"]["rejected"] == {}
    assert first["sites"] == {"hospital-a": "training site, 6 training images",
                              "hospital-b": "training site, 5 training images",
                              "hospital-c": "training and validation site, 4 training images"}
    assert any(s.get("val_miou") is not None for s in server)
    clients = [c for _, snap in snapshots for c in _groups(snap, "FussExecutor") if "metrics" in c]
    assert {c["site"] for c in clients} >= set(HOSPITALS)
    trained = [c for c in clients if c["role"].startswith("training") and c["round"] == 0]
    assert trained and all(c["device"] == "cpu" and {"loss_self", "seconds"} <= set(c["metrics"]) for c in trained)
    assert metrics["rounds"][-1]["validation"]["hospital-c"]["num_images"] == 3
    for rec in metrics["rounds"]:
        for entry in rec["train"].values():
            assert set(entry["param_keys"]) == MODEL_KEYS
            assert set(entry["meta_keys"]) <= {"num_samples", "site", "initial_metrics", "filter_history"}

    # audit: the site policy's filters (source "site") ran before the job's on every task result of every site
    audit = result / "audit"
    for site in HOSPITALS:
        lines = fuss_poc.audit_lines(audit / site / job_id)
        text = "\n".join(lines)
        train_results = 2
        assert sum("applied filter: ExcludeVars@site on task_result" in x for x in lines) == train_results, text
        assert sum("applied filter: FussResultFilter@site on task_result" in x for x in lines) >= train_results + 1
        assert sum("applied filter: FussResultFilter@job on task_result" in x for x in lines) >= train_results + 1
        assert sum("applied filter: CentroidPrivacyFilter@job on task_result" in x for x in lines) == train_results
        first, last = account(3, clip, sigma, 1e-5, 1), account(3, clip, sigma, 1e-5, 2)
        assert f"release 1: per round (epsilon={first.epsilon:.4g}, delta=1e-05)" in text
        assert f"cumulative (epsilon={last.total_epsilon:.4g}, delta=2e-05) by simple composition" in text
        assert "3/3 rows clipped" in text
        order = [x.split("applied filter: ")[1].split(" on ")[0] for x in lines if "applied filter: " in x
                 and "[A:train#" in x][:4]
        assert order == ["ExcludeVars@site", "FussResultFilter@site", "FussResultFilter@job",
                         "CentroidPrivacyFilter@job"], order
        assert (audit / site / "audit.log").is_file()  # the site-level audit log (job start, commands)

    # the values the server received in round 0, against the sites' own computation
    received = torch.load(app / "received" / "round_0.pt", weights_only=True)
    job_cfg = FussConfig.load(job / "app" / "config" / "fuss_config.json")
    build_model(job_cfg)  # see tests/test_flare_sim.py: warm timm up before the seeded initial model
    start = init_global_state(job_cfg)
    residuals = []
    for site in HOSPITALS:
        site_cfg = job_cfg.with_overrides(json.loads(hospital_data["sites"][site].config_file.read_text()))
        ref_head, ref_centroids = split_state(Site(site_cfg, site).train(start, 0).state)
        head, centroids = split_state(received[site]["params"])
        # FLARE's own record of the DXO filters that acted on the way out (FussResultFilter is not a DXOFilter)
        assert json.loads(received[site]["meta"])["filter_history"] == ["ExcludeVars", "CentroidPrivacyFilter"]
        for key, value in ref_head.items():  # the head is not noised
            assert torch.allclose(head[key], value, atol=1e-5), (site, key)
        residuals.append((centroids - clip_rows(ref_centroids, clip)[0]).flatten().double())
        assert not torch.allclose(centroids, clip_rows(ref_centroids, clip)[0], atol=1e-3)
    noise = torch.cat(residuals)  # 3 sites x 3 centroids x 8 dims, expected N(0, (sigma * C)^2)
    assert abs(float(noise.mean())) < 4 * sigma * clip / math.sqrt(noise.numel())
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.4)

    # TensorBoard events streamed from the sites to the server, as in the simulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = next(result.rglob("tb_events"))
    tags = {}
    for folder in tb.iterdir():
        acc = EventAccumulator(str(folder))
        acc.Reload()
        tags[folder.name] = set(acc.Tags()["scalars"])
    for site in HOSPITALS:
        assert {"train/loss_self", "train/loss_centroids"} <= tags[site], tags
    assert {"val/miou"} <= tags["hospital-c"]


def test_job_asking_for_a_scope_the_sites_do_not_define_is_refused(hospitals, hospital_data, tmp_path):
    fed = hospitals
    job = _job(hospital_data, tmp_path, "tiny_bad_scope", "--privacy-scope", "no-such-scope")
    job_id, meta, result = _run_job(fed, job, tmp_path / "result", timeout=180)
    assert meta["status"] != "FINISHED:COMPLETED"
    logs = _server_log(result) + (fed.kits[fed.server_name] / "log.txt").read_text(errors="replace")
    assert "no-such-scope" in logs and "not allowed" in logs


def test_site_started_with_a_wrong_data_path_fails_the_job_naming_the_site(hospitals, hospital_data, tmp_path):
    fed, site = hospitals, "hospital-b"
    good = hospital_data["sites"][site]
    bad_root = tmp_path / "no_such_data_root"
    bad_cfg = tmp_path / "fuss_site_bad.json"
    bad_cfg.write_text(json.dumps({**json.loads(good.config_file.read_text()), "data.root": str(bad_root)}))
    fed.restart_site(site, {**_hospital_env(fed, site, hospital_data), fuss_poc.SITE_CONFIG_ENV: str(bad_cfg)})
    try:
        job = _job(hospital_data, tmp_path, "tiny_wrong_path")
        job_id, meta, result = _run_job(fed, job, tmp_path / "result", timeout=240)
        assert meta["status"] != "FINISHED:COMPLETED"
        server = _server_log(result)
        assert f"site {site} did not report its role" in server, server[-4000:]
        assert "fewer than min_clients" in server
        site_log = _site_log(fed, site, job_id)
        assert "DataError" in site_log and str(bad_root) in site_log and f"site {site!r}" in site_log
        metrics = json.loads((_app_server(result) / "metrics.json").read_text())
        assert site in metrics["error"] or "fewer than min_clients" in metrics["error"]
    finally:
        fed.restart_site(site, _hospital_env(fed, site, hospital_data))


# ---------------------------------------------------------------------------------------------- hostile jobs

DO_NOTHING_FILTERS = '''"""A hostile job's fuss_flare/filters.py: same class names, writes the audit lines, filters nothing."""
from nvflare.apis.filter import Filter
from nvflare.apis.utils.fl_context_utils import add_job_audit_event


class FussResultFilter(Filter):
    def __init__(self, **kwargs):
        super().__init__()

    def process(self, shareable, fl_ctx):
        add_job_audit_event(fl_ctx=fl_ctx, msg="applied filter: FussResultFilter@site on task_result: nothing dropped")
        return shareable


CentroidPrivacyFilter = FussResultFilter
FussAnalyticsForwarder = FussResultFilter
'''


def _site_ran_job(fed, site: str, job_id: str) -> bool:
    """Whether any of the job's code ran on the site (FLARE creates the job's workspace there when it deploys)."""
    return any((fed.kits[site] / job_id).rglob("app_*")) if (fed.kits[site] / job_id).exists() else False


def test_job_shipping_code_is_refused_by_hospitals(hospitals, hospital_data, tmp_path):
    """A job that ships its own ``fuss_flare/filters.py`` (do-nothing filters writing truthful-looking audit lines)
    and a leaking executor, submitted by the project admin: every hospital refuses to deploy it (its policy gives
    custom code to no role), so none of its code runs on a site and nothing leaves; the refusal is logged."""
    import shutil

    fed = hospitals
    job = _job(hospital_data, tmp_path, "tiny_shadow")
    custom = job / "app" / "custom"
    (custom / "fuss_flare").mkdir(parents=True)
    (custom / "fuss_flare" / "filters.py").write_text(DO_NOTHING_FILTERS)
    shutil.copy(REPO / "tests" / "flare_hostile" / "hostile_executor.py", custom / "hostile_executor.py")
    client_cfg = job / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client_cfg.read_text())
    cfg["executors"][0]["executor"] = {"path": "hostile_executor.HostileExecutor",
                                       "args": {"faults": {h: ["leak"] for h in HOSPITALS}}}
    client_cfg.write_text(json.dumps(cfg))
    job_id, meta, result = _run_job(fed, job, tmp_path / "result", timeout=180)
    assert meta["status"] != "FINISHED:COMPLETED", meta
    server = _server_log(result) + (fed.kits[fed.server_name] / "log.txt").read_text(errors="replace")
    assert "BYOC not permitted" in server, server[-4000:]
    for site in HOSPITALS:
        assert not _site_ran_job(fed, site, job_id), site
        assert not fuss_poc.audit_lines(fed.kits[site] / job_id, "applied filter"), site
    assert not list(result.rglob("received")) and not list(result.rglob("FL_global_model.pt"))


def test_hostile_job_config_cannot_bypass_the_site_policy(hospitals, hospital_data, tmp_path):
    """Jobs without code that try to get around the hospitals' policy. (1) A job that drops its own filters and
    asks for the sites' ``fuss-dp`` scope: the sites' filters still run on what leaves (undeclared content gone,
    centroids clipped and noised by the site), and the audit says so. (2) A job that names FLARE's
    ConvertToFedEvent (raw analytics to the server, around FussAnalyticsForwarder): refused by every hospital's
    class allow list before anything runs."""
    from fuss_components.head import split_state

    fed = hospitals
    job = _job(hospital_data, tmp_path, "tiny_no_job_filters", "--record-updates", "--privacy-scope", "fuss-dp",
               **{"federation.rounds": 1})
    client_cfg = job / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client_cfg.read_text())
    cfg["task_result_filters"] = []
    client_cfg.write_text(json.dumps(cfg))
    job_id, meta, result = _run_job(fed, job, tmp_path / "result1")
    assert meta["status"] == "FINISHED:COMPLETED", _server_log(result)[-4000:]
    received = torch.load(_app_server(result) / "received" / "round_0.pt", weights_only=True)
    assert set(received) == set(HOSPITALS)
    for site in HOSPITALS:
        assert set(received[site]["params"]) == MODEL_KEYS
        _, centroids = split_state(received[site]["params"])
        norms = centroids.norm(dim=1)
        assert not torch.allclose(norms, torch.ones_like(norms), atol=0.05), norms  # noised by the site (sigma 1)
        lines = fuss_poc.audit_lines(result / "audit" / site / job_id)
        text = "\n".join(lines)
        assert "applied filter: FussResultFilter@site on task_result" in text
        assert "CentroidPrivacyFilter" in text and "@job" not in text, text

    job = _job(hospital_data, tmp_path, "tiny_raw_analytics")
    cfg = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    cfg["components"].append({"id": "raw_events", "path":
                              "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
                              "args": {"events_to_convert": ["analytix_log_stats"]}})
    (job / "app" / "config" / "config_fed_client.json").write_text(json.dumps(cfg))
    job_id, meta, result = _run_job(fed, job, tmp_path / "result2", timeout=180)
    assert meta["status"] != "FINISHED:COMPLETED", meta
    logs = "".join(_site_log(fed, site, job_id) for site in HOSPITALS) + _server_log(result)
    assert "not in allow_list" in logs and "ConvertToFedEvent" in logs, logs[-4000:]
    assert not list(result.rglob("FL_global_model.pt")) or not list(result.rglob("received"))


def test_job_pointing_a_hospital_at_another_dataset_folder_is_ignored_and_audited(hospitals, hospital_data,
                                                                                  tmp_path):
    """A job that names another data root (all hospitals' images) and dataset folder: every hospital owns those keys
    (its kit's fuss_policy.json, written by site_policy --no-byoc), so each trains on its own folder, and its
    audit log names the job's ignored values."""
    fed = hospitals
    other = hospital_data["tmp"] / "shared"  # the consortium's whole dataset, every hospital's images
    job = _job(hospital_data, tmp_path, "tiny_other_folder", **{"federation.rounds": 1, "data.root": str(other),
                                                                "data.dataset": "hospital-a-images"})
    job_id, meta, result = _run_job(fed, job, tmp_path / "result", timeout=240)
    assert meta["status"] == "FINISHED:COMPLETED", _server_log(result)[-4000:]
    metrics = json.loads((_app_server(result) / "metrics.json").read_text())
    declared = {site: entry["num_samples"] for site, entry in metrics["rounds"][0]["train"].items()}
    assert declared == {site: len(d.train_ids) for site, d in hospital_data["sites"].items()}, metrics
    for site in HOSPITALS:
        text = "\n".join(fuss_poc.audit_lines(result / "audit" / site / job_id, "ignores the job's"))
        assert f"data.root={str(other)!r}" in text and "data.dataset='hospital-a-images'" in text, text
        assert str(hospital_data["sites"][site].data_root) in text


def _kill_after_first_round(fed, site: str, job_id: str, timeout: float = 120) -> None:
    """Wait until the server recorded round 0, then kill every process of ``site`` at once."""
    metrics = fed.server_job_dir(job_id) / "app_server" / "metrics.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file():
            try:
                if json.loads(metrics.read_text())["rounds"]:
                    break
            except (ValueError, KeyError):
                pass
        time.sleep(0.2)
    else:
        raise TimeoutError("round 0 did not finish")
    assert fed.kill_site(site)


@pytest.mark.slow
def test_killed_site_lets_the_job_finish_with_the_others_when_min_clients_allows(hospitals, hospital_data,
                                                                                   tmp_path):
    fed, site = hospitals, "hospital-a"
    job = _job(hospital_data, tmp_path, "tiny_kill_ok", *FAST_DEAD_SITE, **{
        "federation.rounds": 3, "federation.min_clients": 2, "federation.local_steps": 20})
    try:
        job_id, meta, result = _run_job(fed, job, tmp_path / "result", timeout=300,
                                        during=lambda jid: _kill_after_first_round(fed, site, jid))
        assert meta["status"] == "FINISHED:COMPLETED", _server_log(result)[-4000:]
        metrics = json.loads((_app_server(result) / "metrics.json").read_text())
        accepted = [r["accepted"] for r in metrics["rounds"]]
        assert accepted[0] == HOSPITALS and accepted[-1] == ["hospital-b", "hospital-c"], accepted
        assert (_app_server(result) / "fuss_model.pt").is_file()
        assert f"Client {site} is deemed disconnected" in _server_log(result)
    finally:
        fed.restart_site(site, _hospital_env(fed, site, hospital_data))


@pytest.mark.slow
def test_killed_site_fails_the_job_clearly_when_min_clients_does_not_allow(hospitals, hospital_data, tmp_path):
    """(The killed site is not restarted: the next test stops the federation and checks nothing is left.)"""
    fed, site = hospitals, "hospital-a"
    job = _job(hospital_data, tmp_path, "tiny_kill_fail", *FAST_DEAD_SITE, **{
        "federation.rounds": 2, "federation.min_clients": 3, "federation.local_steps": 20})
    job_id, meta, result = _run_job(fed, job, tmp_path / "result", timeout=300,
                                    during=lambda jid: _kill_after_first_round(fed, site, jid))
    assert meta["status"] != "FINISHED:COMPLETED"
    server = _server_log(result)
    assert f"Client {site} is deemed disconnected" in server, server[-4000:]
    assert "Alive clients 2 < required min 3" in server or "fewer than min_clients=3" in server, server[-4000:]
    assert not list(result.rglob("fuss_model.pt"))


def test_stopping_the_hospitals_leaves_no_process_and_no_port(hospitals):
    hospitals.stop()
    assert hospitals.leftovers() == {"processes": [], "ports_in_use": []}


# ---------------------------------------------------------------------------------------------- the command


def test_poc_command_stops_everything_on_ctrl_c(hospital_data, tmp_path):
    """`poc/run.sh` interrupted (SIGINT, as Ctrl-C) once its federation is up: it stops every process it started,
    frees its ports, prints its result line and exits non-zero."""
    import psutil

    data = hospital_data["tmp"] / "shared"
    workdir = tmp_path / "run"
    cmd = ["bash", str(REPO / "poc" / "run.sh"), "--dataset", "tiny", "--data-root", str(data),
           "--partition", str(hospital_data["tmp"] / "partition.json"), "--images-per-site", "0", "--val-images", "0",
           "--workdir", str(workdir), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
           *(f"--set={k}={json.dumps(v)}" for k, v in {
               "backbone.name": "fuss_tiny_vit_patch14", "backbone.weights": "random", "backbone.block": -1,
               "data.train_size": 28, "data.eval_short_side": 42, "train.dim": 8, "train.batch_size": 4,
               "train.num_clusters": 3, "train.knn": 2, "train.num_random": 2, "loss.grid": 3}.items())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "sites connected" in line:
                proc.send_signal(2)  # SIGINT
                break
        lines += proc.stdout.readlines()
        assert proc.wait(120) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert "interrupted: stopping everything" in out, out[-3000:]
    assert lines[-1].startswith(fuss_poc.RESULT_PREFIX + " INTERRUPTED") and "leftovers=none" in lines[-1], out[-3000:]
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(workdir) in part for part in p.info["cmdline"] or []):
                left.append(p.info)
        except psutil.Error:
            pass
    assert not left


# ---------------------------------------------------------------------------------------------- POC, camvid


@pytest.mark.realdata
@pytest.mark.slow
def test_camvid_poc_end_to_end(shared, tmp_path):
    """poc/run.sh's command in POC mode: 3 camvid sites, 2 rounds, real backbone, Session API; the admin console
    against the running POC; the result (model, metrics, TensorBoard events, audit logs) downloaded; all gone."""
    from fuss_components.datasets import open_dataset

    ds = open_dataset("camvid", shared / "data")
    pick = {s: [x.id for x in ds.samples(site=s) if x.extra.get("fed_split") == "train"] for s in
            ("0001TP", "0006R0", "0016E5")}
    test_frames = [x.id for x in ds.samples(site="0016E5") if x.extra.get("fed_split") == "test"]
    part = Partition(dataset="camvid", strategy="site", seed=0, num_classes=11,
                     clients={s: fuss_poc.subsample(ids, 8) for s, ids in pick.items()},
                     validation={"0016E5": fuss_poc.subsample(test_frames, 4)})
    manifest = part.save(tmp_path / "camvid_poc.json")
    cache = os.environ.get("FUSS_CACHE_DIR") or str(tmp_path / "cache")
    console: dict = {}

    def admin_console(fed, job_id, result_dir):
        console["out"] = fed.admin_console(["check_status server", "check_status client", "list_jobs"])
        console["job_id"] = job_id
        console["run_id"] = fed.run_id
        console["ports"] = (fed.fl_port, fed.admin_port)

    args = fuss_poc.get_args_parser().parse_args([
        "--mode", "poc", "--dataset", "camvid", "--data-root", str(shared / "data"), "--partition", str(manifest),
        "--rounds", "2", "--local-steps", "10", "--centroid-noise", "0.05", "--centroid-clip", "1",
        "--privacy-json", str(fuss_poc.PRIVACY_EXAMPLE), "--cache-dir", cache, "--workdir", str(tmp_path / "run"),
        "--out", str(tmp_path / "out"), "--images-per-site", "0", "--val-images", "0",
        "--heartbeat-timeout", "60"])
    started = time.perf_counter()
    summary = fuss_poc.run(args, after_job=admin_console)
    TIMINGS["camvid_poc"] = time.perf_counter() - started
    print("\ncamvid POC summary:", json.dumps(summary, indent=1, default=str))
    assert summary["status"] == "FINISHED:COMPLETED", summary
    assert summary["leftovers"] == {"processes": [], "ports_in_use": []}
    # the summary file is written after the stop: it says what the stop left behind
    written = json.loads((Path(summary["downloaded"]).parent / "poc_summary.json").read_text())
    assert written["leftovers"] == summary["leftovers"] and written["seconds"] == summary["seconds"]
    assert all(fuss_poc.port_is_free(p) for p in console["ports"])
    assert not fuss_poc._marked(console["run_id"])

    # the admin console answered while the POC ran
    out = console["out"]
    assert console["job_id"] in out and "FINISHED:COMPLETED" in out, out[-3000:]
    for site in CAMVID_SITES:
        assert site in out

    # downloaded: global model (loaded by `fuss evaluate`), metrics, TensorBoard events; collected: audit logs
    model = Path(summary["global_model"])
    proc = subprocess.run([str(Path(sys.executable).with_name("fuss")), "evaluate", "--model", str(model),
                           "--out", str(tmp_path / "eval"), "--set", f"cache_dir={cache}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["miou"] == pytest.approx(summary["val_miou"], abs=1e-6)
    # TensorBoard: every site's folder of events, streamed to the server during the run
    assert {Path(p).parent.name for p in summary["tb_events"]} >= set(CAMVID_SITES), summary["tb_events"]
    result = Path(summary["downloaded"]).parent
    for site in CAMVID_SITES:
        lines = fuss_poc.audit_lines(result / "audit" / site)
        text = "\n".join(lines)
        for name in ("ExcludeVars@site", "FussResultFilter@site", "FussResultFilter@job",
                     "CentroidPrivacyFilter@job"):
            assert f"applied filter: {name} on task_result" in text, (site, name)
