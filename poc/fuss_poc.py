#!/usr/bin/env python3
"""FUSS on a real NVIDIA FLARE federation on this machine: POC or provisioned startup kits, loopback only.

    bash poc/run.sh                                   # camvid, 4 sites, quick budget: prepare, start, submit,
                                                      # follow, download, stop, clean (also on failure / Ctrl-C)
    bash poc/run.sh --images-per-site 8 --val-images 4 --rounds 2 --local-steps 10 --out runs/poc
    bash poc/run.sh --mode prod                       # the same through `nvflare provision` of poc/project.yml
    bash poc/run.sh --centroid-noise 0.05 --centroid-clip 1 --privacy-json poc/privacy.json

What ``run`` does (each step is a function of this module, used by ``tests/test_poc.py`` as well):

1. *Sites' data.* Every site gets what a real site would have: its own folder of the dataset (``meta.json``
   restricted to its images; the image and label files are symbolic links into the shared dataset, nothing is
   copied), its own partition entry (a manifest holding only that site), and a site configuration
   ``fuss_site.json`` (``data.root``, ``partition``, ``cache_dir``) that the FLARE client script reads through
   ``$FUSS_SITE_CONFIG`` (``fuss_flare.load_site_config``). The job itself carries no site paths.
2. *Kits.* ``nvflare poc prepare -i project.yml`` (mode ``poc``) or ``nvflare provision -p project.yml`` (mode
   ``prod``, from ``poc/project.yml``, the hospital federation) with free ports picked for this run; then every
   kit is pointed at ``localhost`` (the server's ``target`` becomes ``localhost:<port>``, which makes FLARE bind
   127.0.0.1 only, never 0.0.0.0; clients and admin connect to ``localhost``). ``$HOME`` and
   ``$NVFLARE_POC_WORKSPACE`` point into the run's folder, so nothing is written to the user's home.
3. *Start.* The server, then every site with its own environment (``FUSS_SITE_CONFIG``), each from its kit's
   ``startup/sub_start.sh`` in its own process session, as a site operator would run ``start.sh``.
4. *Job.* Exported with ``fuss job export`` (``custom/fuss_flare/job.py``), submitted, followed and downloaded
   through the Session API (``nvflare.fuel.flare_api.flare_api.new_secure_session``) as the project admin.
5. *Results.* The downloaded job (global model ``fuss_model.pt``, ``metrics.json``, TensorBoard events streamed
   from the sites to the server), plus every participant's ``audit.log`` (site level) and ``<job>/audit.log``
   (job level) and job logs, copied from the kits into ``<out>/<job id>/``.
6. *Stop.* Session API ``shutdown_system``, then whatever is left of the processes started here (found by a
   marker in their environment, so orphaned job processes are found too) is terminated; the run's ports must be
   free again. The run folder is removed unless ``--keep``.

The last line printed by ``run`` states the result (``FUSS POC RESULT: ...``); the exit status is 0 only for
``FINISHED:COMPLETED``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
POC_DIR = Path(__file__).resolve().parent
PROJECT_TEMPLATE = POC_DIR / "project.yml"
PRIVACY_EXAMPLE = POC_DIR / "privacy.json"
MARKER_ENV = "FUSS_POC_RUN"  # set in the environment of every process this module starts
SITE_CONFIG_ENV = "FUSS_SITE_CONFIG"
POC_ADMIN = "admin@fuss.org"
RESULT_PREFIX = "FUSS POC RESULT:"


def _bin(name: str) -> str:
    """A console script of the running interpreter's environment (the project's venv)."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def log(msg: str) -> None:
    print(f"[fuss-poc {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- ports


def port_is_free(port: int) -> bool:
    """No socket listens on ``port``, on loopback or any other address (connections of a closed listener that
    linger in TIME_WAIT do not count: SO_REUSEADDR, as every server sets)."""
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free on loopback right now (the kernel picks them)."""
    ports: list[int] = []
    socks = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
            port = sock.getsockname()[1]
            if port not in ports:
                ports.append(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


# ---------------------------------------------------------------------------------------------- site data


@dataclass
class SiteData:
    """What one site holds: its data folder, its partition entry and its FUSS site configuration."""

    name: str  # the FLARE client name (see fuss_components.site.flare_client_name)
    folder: Path
    data_root: Path
    partition_file: Path
    config_file: Path
    train_ids: list[str] = field(default_factory=list)
    validation_ids: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {SITE_CONFIG_ENV: str(self.config_file)}


def site_environments(site_data: dict[str, "SiteData"], gpus: str | None) -> dict[str, dict[str, str]]:
    """Each site's start environment; with ``gpus`` (``"0,1"``) the sites get those GPUs in turn, one each, as
    ``CUDA_VISIBLE_DEVICES`` (several sites on one machine, each on its own GPU)."""
    ids = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else []
    envs = {}
    for i, (name, data) in enumerate(site_data.items()):
        envs[name] = data.env() | ({"CUDA_VISIBLE_DEVICES": ids[i % len(ids)]} if ids else {})
    return envs


def subsample(ids: list[str], count: int | None) -> list[str]:
    """``count`` ids spread evenly over ``ids`` (all of them when count is None or larger)."""
    ids = sorted(ids)
    if count is None or count >= len(ids):
        return ids
    if count <= 0:
        return []
    step = len(ids) / count
    return [ids[int(i * step)] for i in range(count)]


def build_partition(dataset: str, data_root: Path, spec: str = "", images_per_site: int | None = None,
                    val_images: int | None = None, num_sites: int | None = None, seed: int = 0):
    """The run's partition: a manifest file or a preset of ``fuss_components.partition`` (default: the dataset's
    own preset), optionally cut to ``num_sites`` sites (training sites first) and subsampled."""
    from fuss_components.datasets import open_dataset
    from fuss_components.partition import Partition
    from fuss_components.presets import parse_partition_spec, preset_partition
    from fuss_components.site import site_order

    parsed = parse_partition_spec(spec or dataset)
    if parsed.manifest is not None:
        part = Partition.load(parsed.manifest)
    elif parsed.preset is not None:
        part = preset_partition(parsed.preset, open_dataset(dataset, data_root), seed=seed, num_clients=parsed.clients)
    else:
        raise ValueError("fuss_poc --partition: 'site' needs one data folder per site; give a manifest or a preset")
    keep = site_order(part)[:num_sites] if num_sites else site_order(part)
    clients = {s: subsample(ids, images_per_site) for s, ids in part.clients.items() if s in keep}
    validation = {s: subsample(ids, val_images) for s, ids in part.validation.items() if s in keep}
    return Partition(dataset=part.dataset, strategy=part.strategy, seed=part.seed, num_classes=part.num_classes,
                     clients=clients, validation={s: v for s, v in validation.items() if v},
                     meta={**part.meta, "poc": {"images_per_site": images_per_site, "val_images": val_images}})


def make_site_data(partition, site: str, dataset_dir: Path, folder: Path, cache_dir: Path | None = None,
                   overrides: dict | None = None, name: str | None = None) -> SiteData:
    """Write ``folder``: ``data/<dataset>/`` with this site's images only (symbolic links into ``dataset_dir``,
    a folder-layout dataset with ``meta.json``), ``partition.json`` (this site's entries only, under its FLARE
    client name ``name``, default ``flare_client_name``) and ``fuss_site.json`` (the site's FUSS overrides, read
    through ``$FUSS_SITE_CONFIG``)."""
    from fuss_components.partition import Partition
    from fuss_components.site import flare_client_name

    name = name or flare_client_name(site)
    folder = Path(folder).resolve()
    dataset_dir = Path(dataset_dir).resolve()
    meta_file = dataset_dir / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"per-site data folders need a folder-layout dataset with meta.json: {meta_file}")
    meta = json.loads(meta_file.read_text())
    train_ids = list(partition.clients.get(site, []))
    val_ids = list(partition.validation.get(site, []))
    if not train_ids and not val_ids:
        raise ValueError(f"site {site!r} is not in the partition (sites: {sorted(partition.sites)})")
    wanted = set(train_ids) | set(val_ids)
    items = [it for it in meta["items"] if it["id"] in wanted]
    missing = wanted - {it["id"] for it in items}
    if missing:
        raise ValueError(f"site {site!r}: ids not in {meta_file}: {sorted(missing)[:5]}")
    ds_name = str(meta.get("name") or dataset_dir.name)
    site_ds = folder / "data" / ds_name
    if site_ds.exists():
        shutil.rmtree(site_ds)
    for it in items:
        for kind, ext in (("images", ".jpg"), ("labels", ".png")):
            src = dataset_dir / kind / it["split"] / f"{it['id']}{ext}"
            if src.exists():
                dst = site_ds / kind / it["split"] / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(src, dst)
    site_meta = {k: v for k, v in meta.items() if k not in ("items", "sites", "splits")}
    site_meta.update({"name": ds_name, "items": items, "count": len(items),
                      "note": f"site {site}'s own images only (POC: links into {dataset_dir})"})
    (site_ds / "meta.json").write_text(json.dumps(site_meta, indent=1))
    own = Partition(dataset=partition.dataset, strategy=partition.strategy, seed=partition.seed,
                    num_classes=partition.num_classes, clients={name: train_ids} if train_ids else {},
                    validation={name: val_ids} if val_ids else {}, meta={"site": site, "flare_name": name})
    part_file = own.save(folder / "partition.json")
    site_cfg = {"data.root": str(folder / "data"), "data.dataset": ds_name, "partition": str(part_file),
                "cache_dir": str(cache_dir or folder / "fuss_cache")}
    site_cfg.update(overrides or {})
    cfg_file = folder / "fuss_site.json"
    cfg_file.write_text(json.dumps(site_cfg, indent=1))
    return SiteData(name, folder, folder / "data", part_file, cfg_file, train_ids, val_ids)


# ---------------------------------------------------------------------------------------------- processes


def _marked(run_id: str) -> list:
    """Every live process whose environment carries this run's marker (job processes included)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid():
                continue
            if proc.environ().get(MARKER_ENV) == run_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill(procs: list, sig: int = signal.SIGKILL) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            proc.send_signal(sig)


def listening_sockets(run_id: str) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state held by this run's processes."""
    import psutil

    out = []
    for proc in _marked(run_id):
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    out.append((proc.pid, conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


# ---------------------------------------------------------------------------------------------- federation


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def _dump_yaml(data: dict, path: Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def poc_project(sites: list[str], fl_port: int, admin_port: int, name: str = "fuss_poc",
                admin: str = POC_ADMIN) -> dict:
    """A POC project: server ``server``, the sites, one project admin, FLARE's standard builders."""
    return {
        "api_version": 3,
        "name": name,
        "description": "FUSS POC federation on this machine (loopback only)",
        "participants": [
            {"name": "server", "type": "server", "org": "fuss", "fed_learn_port": fl_port, "admin_port": admin_port},
            *({"name": s, "type": "client", "org": "fuss"} for s in sites),
            {"name": admin, "type": "admin", "org": "fuss", "role": "project_admin"},
        ],
        "builders": [
            {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }


def project_with_ports(project: dict, fl_port: int, admin_port: int, sites: list[str] | None = None) -> dict:
    """A copy of a project.yml with the server's ports replaced (and, optionally, the client list)."""
    project = copy.deepcopy(project)
    parts = project["participants"]
    for p in parts:
        if p["type"] == "server":
            p["fed_learn_port"], p["admin_port"] = fl_port, admin_port
    if sites is not None:
        template = next((p for p in parts if p["type"] == "client"), {"type": "client"})
        known = {p["name"]: p for p in parts if p["type"] == "client"}
        others = [p for p in parts if p["type"] != "client"]
        # every site is its own organisation (an org_admin operates only its own org's sites)
        clients = [known.get(s) or dict(template, name=s, org=s.replace("-", "_")) for s in sites]
        server_idx = next(i for i, p in enumerate(others) if p["type"] == "server")
        project["participants"] = others[:server_idx + 1] + clients + others[server_idx + 1:]
    return project


class Federation:
    """A FLARE federation on loopback: kits, processes, admin session. Use as a context manager (stops all)."""

    def __init__(self, root: str | Path, sites: list[str], mode: str = "poc", project: dict | None = None,
                 admin: str | None = None, heartbeat_timeout: float = 60.0, env: dict | None = None):
        """Args:
            root: the run's folder (kits, logs, HOME of the FLARE tools); created.
            sites: FLARE client names (the partition's site names, see ``fuss_components.site.flare_client_name``).
            mode: ``poc`` (``nvflare poc prepare -i``) or ``prod`` (``nvflare provision -p``).
            project: the project.yml as a dict (prod: e.g. ``poc/project.yml``); ports are replaced by free ones.
            admin: the admin user whose kit drives the federation (default: the project's project_admin).
            heartbeat_timeout: server's ``heart_beat_timeout`` (s) after which a silent site is dropped (sites
                send a heartbeat every 10 s; FLARE's default is 600).
            env: extra environment for every process (e.g. FUSS_CACHE_DIR).
        """
        if mode not in ("poc", "prod"):
            raise ValueError(f"mode must be poc or prod, got {mode!r}")
        self.root = Path(root).resolve()
        self.sites = list(sites)
        self.mode = mode
        self.project_template = project
        self.admin = admin
        self.heartbeat_timeout = heartbeat_timeout
        self.extra_env = dict(env or {})
        self.run_id = uuid.uuid4().hex
        self.home = self.root / "home"
        self.logs = self.root / "logs"
        self.fl_port = self.admin_port = 0
        self.kits: dict[str, Path] = {}
        self.server_name = "server"
        self.procs: dict[str, subprocess.Popen] = {}
        self._session = None

    # ------------------------------------------------------------------ kits
    def base_env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        # every site shares this machine's cores (on a real federation each has its own): without a limit each
        # site's torch uses all cores and the busy-waiting threads slow everyone down
        threads = str(max(1, (os.cpu_count() or 1) // max(1, len(self.sites))))
        return {
            "OMP_NUM_THREADS": threads,
            **os.environ,
            "HOME": str(self.home),
            "NVFLARE_POC_WORKSPACE": str(self.root / "poc_workspace"),
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
            MARKER_ENV: self.run_id,
            **self.extra_env,
        }

    def prepare(self) -> None:
        """Provision the kits with free ports and point them at localhost."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.fl_port, self.admin_port = free_ports(2)
        if self.mode == "poc":
            project = poc_project(self.sites, self.fl_port, self.admin_port)
            if self.project_template:
                project = project_with_ports(self.project_template, self.fl_port, self.admin_port, self.sites)
        else:
            project = project_with_ports(self.project_template or _load_yaml(PROJECT_TEMPLATE), self.fl_port,
                                         self.admin_port)
        project_file = self.root / "project.yml"
        _dump_yaml(project, project_file)
        env = self.base_env()
        if self.mode == "poc":
            cmd = [_bin("nvflare"), "poc", "prepare", "-i", str(project_file), "--force"]
            prod_root = self.root / "poc_workspace" / project["name"] / "prod_00"
        else:
            cmd = [_bin("nvflare"), "provision", "-p", str(project_file), "-w", str(self.root / "provision"),
                   "--force"]
            prod_root = self.root / "provision" / project["name"] / "prod_00"
        proc = subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        (self.logs / "provision.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not prod_root.is_dir():
            raise RuntimeError(f"{' '.join(cmd[1:3])} failed (rc {proc.returncode}): "
                               f"{(proc.stdout + proc.stderr)[-2000:]}")
        parts = project["participants"]
        self.server_name = next(p["name"] for p in parts if p["type"] == "server")
        clients = [p["name"] for p in parts if p["type"] == "client"]
        if sorted(clients) != sorted(self.sites):
            raise RuntimeError(f"the project's clients {clients} are not the run's sites {self.sites}")
        if self.admin is None:
            self.admin = next(p["name"] for p in parts if p.get("role") == "project_admin")
        for p in parts:
            self.kits[p["name"]] = prod_root / p["name"]
        self.admins = {p["name"]: p.get("role") for p in parts if p["type"] == "admin"}
        self.point_kits_at_localhost()
        # the server's job store and snapshots: FLARE's default (resources.json.default) is /tmp/nvflare/..., shared
        # by every federation on the machine; keep them in the run folder (production: a persistent disk)
        from nvflare.lighter.utils import update_storage_locations

        update_storage_locations(local_dir=str(self.kits[self.server_name] / "local"),
                                 workspace=str(self.root / "server_storage"))
        # what every participant of a FUSS federation configures (fuss_flare.site_policy): the classes FUSS jobs
        # may name; on the sites also no custom code (BYOC) for any role and no log streaming to the server
        from fuss_flare import site_policy

        site_policy.install(self.kits[self.server_name])
        for site in self.sites:
            site_policy.install(self.kits[site], byoc=False)

    def point_kits_at_localhost(self) -> None:
        """Loopback only: the server binds ``localhost:<port>`` (FLARE binds 127.0.0.1 for a loopback target and
        0.0.0.0 otherwise); sites and admins connect to localhost. TLS identities are unchanged (the kits name the
        server by its identity, not by the address they dial), as with a DNS entry pointing the server's name at
        127.0.0.1."""
        server_cfg = self.kits[self.server_name] / "startup" / "fed_server.json"
        cfg = json.loads(server_cfg.read_text())
        for server in cfg["servers"]:
            server["service"]["target"] = f"localhost:{self.fl_port}"
            server["admin_port"] = self.admin_port
            server.pop("admin_host", None)
            server["heart_beat_timeout"] = int(self.heartbeat_timeout)  # FLARE rejects a float here
        server_cfg.write_text(json.dumps(cfg, indent=2))
        for site in self.sites:
            client_cfg = self.kits[site] / "startup" / "fed_client.json"
            cfg = json.loads(client_cfg.read_text())
            for server in cfg["servers"]:
                server["service"]["target"] = f"localhost:{self.fl_port}"
            client_cfg.write_text(json.dumps(cfg, indent=2))
        for name in self.admins:
            admin_cfg = self.kits[name] / "startup" / "fed_admin.json"
            cfg = json.loads(admin_cfg.read_text())
            cfg["admin"]["host"], cfg["admin"]["port"] = "localhost", self.admin_port
            admin_cfg.write_text(json.dumps(cfg, indent=2))

    def install_privacy_policy(self, policy: dict | Path, sites: list[str] | None = None) -> None:
        """Write a site privacy policy (``local/privacy.json``) into the kits of ``sites`` (default: all)."""
        text = Path(policy).read_text() if isinstance(policy, (str, Path)) else json.dumps(policy, indent=2)
        json.loads(text)  # fail early on a malformed policy
        for site in sites or self.sites:
            (self.kits[site] / "local" / "privacy.json").write_text(text)

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, env: dict | None = None) -> subprocess.Popen:
        kit = self.kits[name]
        for stale in ("shutdown.fl", "pid.fl", "daemon_pid.fl", "restart.fl"):
            (kit / stale).unlink(missing_ok=True)
        out = open(self.logs / f"{name}.out", "ab")
        try:
            proc = subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh")], cwd=kit,
                                    env={**self.base_env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()
        self.procs[name] = proc
        return proc

    def start_server(self, timeout: float = 120.0) -> None:
        self._spawn(self.server_name)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.procs[self.server_name].poll() is not None:
                raise RuntimeError(f"the server exited: {self.tail(self.server_name)}")
            if not port_is_free(self.admin_port) and not port_is_free(self.fl_port):
                return
            time.sleep(0.5)
        raise TimeoutError(f"the server did not listen on ports {self.fl_port}/{self.admin_port} in {timeout} s")

    def start_site(self, site: str, env: dict | None = None) -> None:
        self._spawn(site, env)

    def start(self, site_env: dict[str, dict] | None = None, timeout: float = 180.0) -> None:
        """Server, then every site with its own environment; returns when all sites are connected."""
        self.start_server(timeout)
        for site in self.sites:
            self.start_site(site, (site_env or {}).get(site))
        self.wait_for_sites(self.sites, timeout)

    def connected_sites(self, since: float = 0.0) -> list[str]:
        """Sites registered with the server (and heard from at or after ``since``, a time.time())."""
        info = self.session().get_system_info()
        return sorted(c.name for c in info.client_info if (c.last_connect_time or 0) >= since)

    def wait_for_sites(self, sites: list[str], timeout: float = 180.0, since: float = 0.0) -> None:
        """Until every one of ``sites`` is registered (a registration at or after ``since``: a restarted site
        logs in again and replaces its old registration)."""
        deadline = time.time() + timeout
        connected: list[str] = []
        while time.time() < deadline:
            with contextlib.suppress(Exception):
                connected = self.connected_sites(since)
                if set(sites) <= set(connected):
                    return
            for site in sites:
                proc = self.procs.get(site)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"site {site} exited: {self.tail(site)}")
            time.sleep(1.0)
        raise TimeoutError(f"sites {sorted(set(sites) - set(connected))} did not connect in {timeout} s")

    def wait_for_site_gone(self, site: str, timeout: float) -> None:
        """Until the server no longer lists ``site`` (its heartbeat timed out)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(Exception):
                if site not in self.connected_sites():
                    return
            time.sleep(1.0)
        raise TimeoutError(f"the server still lists {site} after {timeout} s")

    def site_processes(self, site: str) -> list:
        """The processes of one site: its daemon, client process and job processes (own sessions included)."""
        kit = str(self.kits[site])
        procs = {p.pid: p for p in _tree(self.procs[site].pid)} if site in self.procs else {}
        for proc in _marked(self.run_id):
            with contextlib.suppress(Exception):
                if any(kit in part for part in proc.cmdline()) or proc.cwd().startswith(kit):
                    procs[proc.pid] = proc
        return list(procs.values())

    def kill_site(self, site: str) -> list[int]:
        """SIGKILL every process of a site at once (a crashed machine); returns their pids."""
        procs = self.site_processes(site)
        _kill(procs, signal.SIGKILL)
        if site in self.procs:
            with contextlib.suppress(Exception):
                self.procs[site].wait(10)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.wait(10)
        return [p.pid for p in procs]

    def restart_site(self, site: str, env: dict | None = None, timeout: float = 180.0) -> None:
        """Stop a site (SIGKILL) and start it again, e.g. with another environment; returns once it has logged in
        again (FLARE replaces the old registration of the same name)."""
        self.kill_site(site)
        since = time.time()
        self.start_site(site, env)
        self.wait_for_sites([site], timeout, since=since)

    def tail(self, name: str, chars: int = 3000) -> str:
        texts = []
        for path in (self.logs / f"{name}.out", self.kits.get(name, Path("/nonexistent")) / "log.txt"):
            if path.is_file():
                texts.append(path.read_text(errors="replace")[-chars:])
        return "\n".join(texts)

    # ------------------------------------------------------------------ admin
    def session(self):
        if self._session is None:
            from nvflare.fuel.flare_api.flare_api import new_secure_session

            with _env(HOME=str(self.home)):
                self._session = new_secure_session(self.admin, str(self.kits[self.admin]), timeout=60.0)
        return self._session

    def submit(self, job_dir: str | Path) -> str:
        return self.session().submit_job(str(Path(job_dir).resolve()))

    def wait_for_job(self, job_id: str, timeout: float = 900.0, on_status: Callable | None = None) -> dict:
        """Poll the job's meta until it is finished; returns the meta (``status`` e.g. FINISHED:COMPLETED)."""
        deadline = time.time() + timeout
        last = None
        while True:
            _raise_if_interrupted()
            meta = self.session().get_job_meta(job_id)
            status = meta.get("status")
            if status != last:
                last = status
                if on_status:
                    on_status(status)
            if status and status.startswith("FINISHED"):
                return meta
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {status} after {timeout} s")
            time.sleep(1.0)

    def server_job_dir(self, job_id: str) -> Path:
        """The server's workspace of a running / finished job (local POC shortcut; admins use download_job)."""
        return self.kits[self.server_name] / job_id

    def download(self, job_id: str, dest: str | Path) -> Path:
        """Download the job result (server workspace of the job) into ``dest``; returns its folder."""
        dest = Path(dest).resolve()
        dest.mkdir(parents=True, exist_ok=True)
        return Path(self.session().download_job_result(job_id, str(dest)))

    def collect(self, job_id: str, dest: str | Path) -> dict[str, list[str]]:
        """Copy every participant's site-level ``audit.log``, job-level ``<job>/audit.log`` and job log into
        ``dest/audit/<participant>/`` and ``dest/logs/<participant>/`` (the POC shortcut: on a real
        federation each site keeps these; an admin reads them with the console's ``cat``/``tail`` commands)."""
        dest = Path(dest)
        found: dict[str, list[str]] = {}
        for name in [self.server_name, *self.sites]:
            kit = self.kits[name]
            for src, rel in ((kit / "audit.log", Path("audit") / name / "audit.log"),
                             (kit / job_id / "audit.log", Path("audit") / name / job_id / "audit.log"),
                             (kit / "log.txt", Path("logs") / name / "log.txt"),
                             (kit / job_id / "log.txt", Path("logs") / name / job_id / "log.txt")):
                if src.is_file():
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dest / rel)
                    found.setdefault(name, []).append(str(rel))
        return found

    def admin_console(self, commands: list[str], user: str | None = None, timeout: float = 120.0) -> str:
        """Drive ``<admin kit>/startup/fl_admin.sh`` non-interactively: commands on stdin, answers on stdout."""
        user = user or self.admin
        kit = self.kits[user]
        admin_cfg = json.loads((kit / "startup" / "fed_admin.json").read_text())["admin"]
        login = [] if admin_cfg.get("uid_source") == "cert" else [user]  # provisioned kits ask "User Name:"
        script = "\n".join([*login, *commands, "bye"]) + "\n"
        proc = subprocess.run(["bash", str(kit / "startup" / "fl_admin.sh")], input=script, text=True,
                              capture_output=True, timeout=timeout, env=self.base_env(), cwd=kit)
        return proc.stdout + proc.stderr

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = 40.0) -> list[str]:
        """Shut everything down and make sure nothing is left; returns what had to be killed (for the report)."""
        killed: list[str] = []
        if self._session is not None:
            with contextlib.suppress(Exception):
                for job in self._session.list_jobs():
                    if not str(job.get("status", "")).startswith("FINISHED"):
                        self._session.abort_job(job["job_id"])
            with contextlib.suppress(Exception):
                self._session.shutdown_system()
            with contextlib.suppress(Exception):
                self._session.close()
            self._session = None
        for kit in self.kits.values():  # tells every sub_start.sh daemon not to restart its process
            if kit.is_dir():
                with contextlib.suppress(OSError):
                    (kit / "shutdown.fl").touch()
        deadline = time.time() + timeout
        while time.time() < deadline and _marked(self.run_id):
            time.sleep(0.5)
        left = _marked(self.run_id)
        if left:
            killed = [f"{p.pid}:{' '.join(_safe_cmdline(p))[:120]}" for p in left]
            _kill(left, signal.SIGTERM)
            time.sleep(2.0)
            _kill(_marked(self.run_id), signal.SIGKILL)
            end = time.time() + 10
            while time.time() < end and _marked(self.run_id):
                time.sleep(0.2)
        for proc in self.procs.values():
            with contextlib.suppress(Exception):
                proc.wait(5)
        return killed

    def leftovers(self) -> dict:
        """What would be left behind: processes of this run, and the run's ports still bound."""
        return {
            "processes": [f"{p.pid}:{' '.join(_safe_cmdline(p))[:160]}" for p in _marked(self.run_id)],
            "ports_in_use": [p for p in (self.fl_port, self.admin_port) if p and not port_is_free(p)],
        }

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _safe_cmdline(proc) -> list[str]:
    try:
        return proc.cmdline()
    except Exception:
        return ["?"]


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------- job


def export_job(cfg, out: Path, name: str, *extra: str) -> Path:
    """``fuss job export --config <cfg> --out <out> --name <name> [extra]`` (the one job definition)."""
    from fuss_flare.job import main as job_main

    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / f"{name}.json"
    cfg.save(cfg_file)
    rc = job_main(["export", "--config", str(cfg_file), "--out", str(out), "--name", name, *extra])
    if rc != 0:
        raise RuntimeError(f"fuss job export failed (rc {rc})")
    return out / name


def audit_lines(folder: str | Path, pattern: str = "") -> list[str]:
    """Lines of every ``audit.log`` under ``folder`` that contain ``pattern``."""
    out = []
    for path in sorted(Path(folder).rglob("audit.log")):
        out += [line for line in path.read_text(errors="replace").splitlines() if pattern in line]
    return out


# ---------------------------------------------------------------------------------------------- one command


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poc/run.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("poc", "prod"), default="poc",
                   help="poc: nvflare poc prepare; prod: nvflare provision of --project (default poc)")
    p.add_argument("--project", default=str(PROJECT_TEMPLATE),
                   help="project.yml for --mode prod (server and admins are kept; its clients are replaced by "
                        "the partition's sites)")
    p.add_argument("--dataset", default="camvid", help="dataset (folder layout under the data root)")
    p.add_argument("--data-root", help="shared data root (default: $FUSS_DATA_ROOT or ../shared/data)")
    p.add_argument("--partition", default="", help="manifest .json or preset (default: the dataset's preset)")
    p.add_argument("--num-sites", type=int, help="only the first N sites of the partition, training sites first "
                                                   "(default: all; camvid: 3 training sites + Seq05VD validating)")
    p.add_argument("--images-per-site", type=int, default=16, help="training images per site (0: all)")
    p.add_argument("--val-images", type=int, default=8, help="validation images per validation site (0: all)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--min-clients", type=int, help="fewest training sites a round needs (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="FussConfig override for the job (as fuss job export --set)")
    p.add_argument("--centroid-noise", type=float, help="CentroidPrivacyFilter noise multiplier sigma")
    p.add_argument("--centroid-clip", type=float, help="CentroidPrivacyFilter clip norm C")
    p.add_argument("--privacy-json", help="site privacy policy installed in every site's local/privacy.json")
    p.add_argument("--privacy-scope", default="", help="privacy scope the job asks for")
    p.add_argument("--cache-dir", help="feature cache shared by the sites (default: one per site in the run "
                                       "folder, or $FUSS_CACHE_DIR)")
    p.add_argument("--gpus", help="GPU ids the sites get in turn, one each (CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3")
    p.add_argument("--workdir", help="run folder (default: a new folder under the system temp dir)")
    p.add_argument("--out", default="runs/poc", help="where the downloaded results go (default runs/poc)")
    p.add_argument("--keep", action="store_true", help="keep the run folder (kits, logs) after stopping")
    p.add_argument("--timeout", type=float, default=1800, help="seconds the job may take")
    p.add_argument("--heartbeat-timeout", type=float, default=60, help="server's site heartbeat timeout (s)")
    return p


_SIGNALS: list[int] = []  # signals received; a KeyboardInterrupt raised inside FLARE's admin API can be swallowed


def _interrupt(signum, _frame):
    _SIGNALS.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _raise_if_interrupted() -> None:
    """Raise again for a signal whose KeyboardInterrupt library code caught (FLARE's session threads do)."""
    if _SIGNALS:
        raise KeyboardInterrupt(f"signal {_SIGNALS[-1]}")


def run(args: argparse.Namespace, after_job: Callable | None = None) -> dict:
    """The one command. Returns a summary dict; ``summary["status"]`` is the job's final status (or the error).

    ``after_job(federation, job_id, result_dir)`` is called while the federation still runs (tests use it to
    drive the admin console against the running POC).
    """
    from fuss_components.config import FussConfig, parse_overrides
    from fuss_components.paths import data_root as resolve_data_root
    from fuss_components.presets import PRESETS, preset_config

    started = time.perf_counter()
    own_workdir = not args.workdir
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fuss_poc_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out_root = Path(args.out).resolve()
    summary: dict = {"status": "NOT STARTED", "workdir": str(workdir), "mode": args.mode}
    result_dir: Path | None = None
    fed: Federation | None = None
    _SIGNALS.clear()
    old_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in old_handlers:
        signal.signal(sig, _interrupt)
    try:
        # 1. partition and each site's own data folder + configuration
        root = Path(args.data_root).resolve() if args.data_root else resolve_data_root(None)
        part = build_partition(args.dataset, root, args.partition, args.images_per_site or None,
                               args.val_images or None, args.num_sites)
        part_file = part.save(workdir / "partition.json")
        from fuss_components.site import flare_client_name, site_order

        cache = args.cache_dir or os.environ.get("FUSS_CACHE_DIR")
        site_data = {flare_client_name(s): make_site_data(part, s, root / args.dataset,
                                                          workdir / "sites" / flare_client_name(s),
                                                          Path(cache).resolve() if cache else None)
                     for s in site_order(part)}
        sites = list(site_data)
        log(f"sites {sites}: " + ", ".join(f"{s} {len(d.train_ids)} train / {len(d.validation_ids)} val"
                                            for s, d in site_data.items()))
        # 2. the job (no site paths in it)
        preset = next((k for k, v in PRESETS.items() if v.dataset == args.dataset), None)
        cfg = preset_config(preset) if preset else FussConfig.from_dict({"data": {"dataset": args.dataset}})
        overrides = {"partition": str(part_file), "federation.rounds": args.rounds}
        if args.local_steps:
            overrides["federation.local_steps"] = args.local_steps
        if args.min_clients:
            overrides["federation.min_clients"] = args.min_clients
        overrides.update(parse_overrides(args.overrides))  # the one --set grammar of every FUSS command
        cfg = cfg.with_overrides(overrides)
        extra = []
        if args.centroid_noise is not None:
            extra += ["--centroid-noise", str(args.centroid_noise)]
        if args.centroid_clip is not None:
            extra += ["--centroid-clip", str(args.centroid_clip)]
        if args.privacy_scope:
            extra += ["--privacy-scope", args.privacy_scope]
        job = export_job(cfg, workdir / "jobs", f"fuss_{args.dataset}_poc", *extra)
        # 3. kits, start
        project = _load_yaml(Path(args.project)) if args.mode == "prod" else None
        if project is not None:
            project = project_with_ports(project, 0, 0, sites)
        fed = Federation(workdir / "federation", sites, mode=args.mode, project=project,
                         heartbeat_timeout=args.heartbeat_timeout)
        fed.prepare()
        if args.privacy_json:
            fed.install_privacy_policy(Path(args.privacy_json))
        log(f"{args.mode} kits in {fed.kits[fed.server_name].parent}; server localhost:{fed.fl_port}, "
            f"admin port {fed.admin_port}")
        fed.start(site_environments(site_data, args.gpus))
        _raise_if_interrupted()
        log(f"server and {len(sites)} sites connected")
        # 4. submit, follow
        _raise_if_interrupted()
        job_id = fed.submit(job)
        _raise_if_interrupted()
        summary["job_id"] = job_id
        log(f"submitted {job.name} as job {job_id}")
        meta = fed.wait_for_job(job_id, args.timeout, on_status=lambda s: log(f"job {job_id}: {s}"))
        _raise_if_interrupted()
        summary["status"] = meta.get("status")
        # 5. results
        result_dir = out_root / job_id
        downloaded = fed.download(job_id, result_dir)
        summary["downloaded"] = str(downloaded)
        summary["collected"] = fed.collect(job_id, result_dir)
        models = sorted(downloaded.rglob("fuss_model.pt"))
        summary["global_model"] = str(models[0]) if models else None
        metrics = sorted(downloaded.rglob("metrics.json"))
        if metrics:
            m = json.loads(metrics[0].read_text())
            summary["metrics"] = str(metrics[0])
            summary["val_miou"] = (m.get("final") or {}).get("val_miou")
            summary["error"] = m.get("error")
        summary["tb_events"] = sorted(str(p.relative_to(downloaded)) for p in downloaded.rglob("events.out.*"))
        summary["audit_filter_lines"] = len(audit_lines(result_dir, "applied filter:"))
        if after_job:
            after_job(fed, job_id, result_dir)
        log(f"results in {result_dir}")
    except KeyboardInterrupt as err:
        summary["status"] = f"INTERRUPTED ({err or 'Ctrl-C'})"
        log("interrupted: stopping everything")
    except Exception as err:  # the command reports, then cleans up
        summary["status"] = f"ERROR: {type(err).__name__}: {err}"
        log(summary["status"])
        if fed is not None:
            for name in [fed.server_name, *fed.sites]:
                if name in fed.kits:
                    log(f"--- {name} (last lines) ---\n{fed.tail(name, 1500)}")
    finally:
        try:
            if fed is not None:
                killed = fed.stop()
                summary["killed_at_stop"] = killed
                summary["leftovers"] = fed.leftovers()
                log(f"stopped; left behind: {summary['leftovers']}")
        finally:
            if own_workdir and not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if result_dir is not None:  # written after the stop, so that it says what the stop left behind
        from fuss_components.files import atomic_write_json

        atomic_write_json(result_dir / "poc_summary.json", summary, default=str)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    summary = run(args)
    ok = summary["status"] == "FINISHED:COMPLETED"
    clean = not (summary.get("leftovers") or {}).get("processes") and not (summary.get("leftovers") or {}).get(
        "ports_in_use")
    miou = summary.get("val_miou")
    print(f"{RESULT_PREFIX} {summary['status']} job={summary.get('job_id')} "
          f"val_miou={'n/a' if miou is None else f'{miou:.4f}'} model={summary.get('global_model')} "
          f"leftovers={'none' if clean else summary.get('leftovers')} seconds={summary['seconds']}", flush=True)
    return 0 if ok and clean else 1


if __name__ == "__main__":
    sys.exit(main())
