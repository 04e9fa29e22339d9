"""The one Python definition of every FUSS FLARE job, and the generator of the committed job folders.

    fuss job export --preset camvid --rounds 5 --local-steps 50 --aggregator fedcc-kmeans --out DIR
    fuss job export --preset cityscapes --clients 6 --fedprox-mu 0.001 --out DIR
    fuss job export --preset camvid --objective smooseg --out DIR     # client objective (docs/objectives.md)
    python -m fuss_flare.job committed --out jobs        # regenerate jobs/fuss_{camvid,cityscapes,polyp,cocostuff27}

A job folder carries configuration only: one app for the server and every site, ``config/config_fed_server.json``
(FussController, FussAggregator, FussModelPersistor, FullModelShareableGenerator, FussRecorder,
TBAnalyticsReceiver), ``config/config_fed_client.json`` (FussExecutor, FussResultFilter, the analytics
forwarder) and ``config/fuss_config.json`` (the run's FussConfig). The classes come from the ``fuss_flare`` package
installed on the server and on every site; a job never ships code, so FLARE does not mark it BYOC and a site's
``class_allow_list`` and privacy filters apply to it. ``meta.json``'s ``deploy_map`` names the partition's sites
(FLARE client names, ``fuss_components.site.flare_client_name``), so ``nvflare simulator <job> -w WS`` runs the
right sites under their own names; ``--deploy-all`` exports ``@ALL`` for a federation whose client names differ.

Privacy options: ``--centroid-noise SIGMA --centroid-clip C`` add ``CentroidPrivacyFilter`` after
``FussResultFilter``; ``--privacy-scope NAME`` asks the sites for a scope of their ``privacy.json``;
``--server-param KEY=VALUE`` sets FLARE server settings such as ``dead_client_grace_period``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from fuss_components.config import AGGREGATORS, EXPORT_FORMATS, OBJECTIVES, ConfigError, FussConfig, parse_override
from fuss_components.datasets import DataError
from fuss_components.presets import PRESETS, parse_partition_spec, preset_config, preset_site_names
from fuss_components.privacy import DEFAULT_DELTA
from fuss_components.site import flare_client_name
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import ExecEnv, Recipe

from fuss_flare import ALL_TASKS, CONFIG_FILE

REPO_JOBS = Path(__file__).resolve().parents[2] / "jobs"
COMMITTED = ("camvid", "cityscapes", "polyp", "cocostuff27")


def build_job(
    cfg: FussConfig,
    name: str,
    sites: tuple[list[str], list[str]] | None = None,
    record_updates: bool = False,
    resume_from: str = "",
    centroid_clip: float | None = None,
    centroid_noise: float = 0.0,
    privacy_delta: float = DEFAULT_DELTA,
    server_params: dict | None = None,
    export_format: str | None = None,
    privacy_scope: str = "",
    deploy_all: bool = False,
    mlflow_uri: str | None = None,
) -> "FussJob":
    """A FedJob running ``cfg`` (rounds, aggregator, FedProx / MOON, E/C/W switches all come from ``cfg``).

    ``sites``: the partition's (training sites, validation-only sites) when known at export time: every round
    waits for all of them, and the job needs at least the training sites (``federation.min_clients`` lowers
    that). ``resume_from``: a ``fuss_checkpoint.pt``; the job continues after its round up to
    ``federation.rounds``. ``centroid_clip`` / ``centroid_noise`` add ``CentroidPrivacyFilter`` (clip each
    centroid row to norm C, add N(0, (sigma C)^2)) after ``FussResultFilter``. ``server_params``: top-level FLARE
    settings of the server app, e.g. ``{"dead_client_grace_period": 0, "dead_client_check_lead_time": 5}``.
    ``export_format``: "torchscript" / "onnx" makes the server export the final model at the end of the run
    (``FussRecorder``); None: no export. ``privacy_scope``: the scope of the sites' ``privacy.json`` the job asks
    for (``meta.json`` ``scope``). ``deploy_all``: ``deploy_map`` ``@ALL`` instead of the partition's site names.
    ``mlflow_uri``: also stream every scalar the sites send (their declared tags: losses, validation scores) to
    MLflow through FLARE's ``MLflowReceiver``: ``""`` for a SQLite store in the job's result folder
    (``mlflow.db``), else the tracking URI of the consortium's MLflow server; None: TensorBoard only.
    """
    from nvflare.job_config.defs import FilterType
    from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
    from fuss_flare.aggregator import FussAggregator
    from fuss_flare.controller import FussController
    from fuss_flare.executor import FussExecutor
    from fuss_flare.filters import CentroidPrivacyFilter, FussAnalyticsForwarder, FussResultFilter
    from fuss_flare.persistor import FussModelPersistor
    from fuss_flare.recorder import FussRecorder

    fed = cfg.federation
    train_sites, validation_only = sites or ([], [])
    all_sites = len(train_sites) + len(validation_only)
    start_round = 0
    if resume_from:
        import torch

        start_round = int(torch.load(resume_from, map_location="cpu", weights_only=True)["round"]) + 1
        if start_round >= fed.rounds:
            raise ConfigError(f"{resume_from} already holds round {start_round - 1}; set --rounds above "
                              f"{start_round} to continue")
    job = FussJob(cfg, name=name, min_clients=fed.min_clients or len(train_sites) or 1,
                  sites=None if deploy_all else sites, privacy_scope=privacy_scope)

    job.to_server(FussController(min_clients=all_sites or fed.min_clients or 1,
                                 min_training_sites=fed.min_clients or len(train_sites) or 1,
                                 num_rounds=fed.rounds - start_round, start_round=start_round), id="controller")
    job.to_server(FussAggregator(), id="aggregator")
    job.to_server(FussModelPersistor(source_ckpt_file_full_name=resume_from or None), id="persistor")
    job.to_server(FullModelShareableGenerator(), id="shareable_generator")
    job.to_server(FussRecorder(resume_from=resume_from, record_updates=record_updates, export_format=export_format),
                  id="recorder")
    job.to_server(TBAnalyticsReceiver(), id="tb_receiver")
    if mlflow_uri is not None:
        from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

        # one MLflow run per site (FLARE's receiver); the server's own global/* scalars stay in TensorBoard
        job.to_server(MLflowReceiver(tracking_uri=mlflow_uri or None, kw_args={"experiment_name": name}),
                      id="mlflow_receiver")
    job.to_server({"server": {"task_request_interval": 0.2}})  # FLARE's 2 s poll would add seconds per task
    if server_params:
        job.to_server(dict(server_params))

    job.to_clients(FussExecutor(), id="executor", tasks=list(ALL_TASKS))
    job.to_clients(FussAnalyticsForwarder(), id="analytics_forwarder")
    job.to_clients(FussResultFilter(), filter_type=FilterType.TASK_RESULT, tasks=list(ALL_TASKS))
    if centroid_clip is not None or centroid_noise:
        job.to_clients(
            CentroidPrivacyFilter(clip=centroid_clip or 1.0, noise_multiplier=centroid_noise, delta=privacy_delta,
                                  rounds=fed.rounds),
            filter_type=FilterType.TASK_RESULT, tasks=list(ALL_TASKS),  # acts on WEIGHTS only
        )
    return job


class FussJob(FedJob):
    """A ``FedJob`` whose folder is a FUSS job folder, however FLARE writes it (``export_job``: ``fuss job
    export``, ``Recipe.export``, ``PocEnv`` / ``ProdEnv`` submission; ``simulator_run``: ``SimEnv``): the run's
    ``FussConfig`` in every app's ``config/fuss_config.json``, no ``custom/`` folder (the classes are installed on
    every participant, so the job is not BYOC), task lists sorted (byte-stable folders), and in ``meta.json`` the
    partition's site names (``deploy_map``), the privacy scope and the GPU each site needs (``resource_spec``)."""

    def __init__(self, cfg: FussConfig, name: str, min_clients: int,
                 sites: tuple[list[str], list[str]] | None = None, privacy_scope: str = ""):
        super().__init__(name=name, min_clients=min_clients)
        self.fuss_config = cfg
        self.fuss_sites = sites
        self.privacy_scope = privacy_scope
        if cfg.federation.site_gpu_memory_gb is not None and not sites:
            raise ConfigError("federation.site_gpu_memory_gb asks each site for a GPU by name (FLARE's "
                              "resource_spec), so the job must name its sites: leave out --deploy-all")

    @property
    def site_names(self) -> list[str]:
        """The FLARE client names of the partition's sites (training sites first); empty when not named."""
        return [flare_client_name(s) for s in self.fuss_sites[0] + self.fuss_sites[1]] if self.fuss_sites else []

    def export_job(self, job_root: str) -> None:
        """Write the job folder ``<job_root>/<name>``, replacing an older export."""
        target = Path(job_root) / self.name
        if target.exists():
            shutil.rmtree(target)
        Path(job_root).mkdir(parents=True, exist_ok=True)
        super().export_job(str(job_root))
        for app in [d for d in target.iterdir() if d.is_dir()]:
            shutil.rmtree(app / "custom", ignore_errors=True)  # the classes are installed on every participant
            self.fuss_config.save(app / "config" / CONFIG_FILE)
            for config in (app / "config").glob("config_fed_*.json"):  # FLARE keeps task lists in sets: sort them
                data = json.loads(config.read_text())
                for section in ("task_result_filters", "task_data_filters", "executors"):
                    for entry in data.get(section, []):
                        entry["tasks"] = sorted(entry["tasks"])
                config.write_text(json.dumps(data, indent=4) + "\n")
        meta = json.loads((target / "meta.json").read_text())
        if self.site_names:
            meta["deploy_map"] = {app: ["server", *self.site_names] for app in meta["deploy_map"]}
        if self.privacy_scope:
            meta["scope"] = self.privacy_scope
        if self.fuss_config.federation.site_gpu_memory_gb is not None:
            meta["resource_spec"] = {name: {"num_of_gpus": 1,
                                            "mem_per_gpu_in_GiB": self.fuss_config.federation.site_gpu_memory_gb}
                                     for name in self.site_names}
        (target / "meta.json").write_text(json.dumps(meta, indent=4) + "\n")

    def simulator_run(self, workspace: str, n_clients: int | None = None, clients: list[str] | None = None,
                      threads: int | None = None, gpu: str | None = None, log_config: str | None = None) -> int:
        """Run this job folder in FLARE's simulator (what ``SimEnv`` calls): ``nvflare simulator`` on the exported
        folder, the partition's sites under their own names unless ``clients`` or another ``n_clients`` is
        given. Returns the simulator's exit status."""
        import subprocess
        import tempfile

        names = list(clients or [])
        if not names and self.site_names and n_clients in (None, 0, len(self.site_names)):
            names = self.site_names
        with tempfile.TemporaryDirectory() as root:
            self.export_job(root)
            command = [sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator",
                       str(Path(root) / self.name), "-w", str(workspace)]
            command += ["-c", ",".join(names)] if names else ["-n", str(n_clients or 1)]
            command += ["-t", str(threads or len(names) or n_clients or 1)]
            command += ["-gpu", gpu] if gpu else []
            command += ["-l", log_config] if log_config else []
            return subprocess.call(command)


class FussRecipe(Recipe):
    """FUSS as a FLARE 2.9 Job Recipe: the same job as ``fuss job export`` and the committed folders (one
    definition, :func:`build_job`), executed where FLARE's recipes run::

        recipe = FussRecipe(preset_config("camvid"))            # or FussRecipe(FussConfig.load(...), preset=...)
        run = recipe.execute(SimEnv(clients=recipe.site_names))  # PocEnv(...), ProdEnv(startup_kit_location=...)
        recipe.export("jobs")                                    # the job folder, byte-equal to jobs/fuss_camvid

    ``preset``: the partition preset whose site names the job deploys to (default: ``cfg.partition`` when it
    is a preset); other keyword arguments are :func:`build_job`'s (``record_updates``, ``centroid_noise``, ...).
    In ``SimEnv`` the simulator's workspace gets the FUSS class allow list (``fuss_flare.site_policy``)."""

    def __init__(self, cfg: FussConfig, name: str | None = None, preset: str | None = None, **job_options):
        if preset is None:
            preset = parse_partition_spec(cfg.partition).preset
        self.fuss_job = build_job(cfg, name or (f"fuss_{preset}" if preset else "fuss_job"),
                                  sites=partition_sites(cfg, preset), **job_options)
        super().__init__(self.fuss_job)

    @property
    def site_names(self) -> list[str]:
        """The FLARE client names the job deploys to (``SimEnv(clients=...)``)."""
        return self.fuss_job.site_names

    def process_env(self, env: ExecEnv) -> None:
        from nvflare.recipe.sim_env import SimEnv

        if isinstance(env, SimEnv):  # FLARE's default allow list knows no FUSS class
            from fuss_flare.site_policy import install

            install(Path(env.workspace_root) / self.fuss_job.name)


def partition_sites(cfg: FussConfig, preset: str | None = None) -> tuple[list[str], list[str]] | None:
    """(training sites, validation-only sites) of the run's partition, or None when not known here.

    Presets and manifests are read offline; any other partition (e.g. ``site``) is resolved from the data when it
    is reachable from this machine.
    """
    try:
        spec = parse_partition_spec(cfg.partition)
    except DataError:
        spec = None
    if preset:
        return preset_site_names(preset, spec.clients if spec else None)
    try:
        if spec is not None and spec.manifest is not None and spec.manifest.is_file():
            manifest = json.loads(spec.manifest.read_text())
            clients, validation = list(manifest["clients"]), list(manifest.get("validation", {}))
        else:
            from fuss_components.site import resolve_partition

            part = resolve_partition(cfg)
            clients, validation = list(part.clients), list(part.validation)
    except Exception:
        return None
    return clients, [s for s in validation if s not in clients]


# ---------------------------------------------------------------------------------------------- command line


def _override(text: str) -> tuple[str, object]:
    try:
        return parse_override(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuss job export",
        description="Export a FUSS NVIDIA FLARE job folder (run it with `nvflare simulator DIR/NAME -w WS`).",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="dataset / partition preset")
    src.add_argument("--config", help="a FussConfig JSON to run instead of a preset")
    parser.add_argument("--out", required=True, help="folder that receives the job folder")
    parser.add_argument("--name", help="job folder name (default: the preset's, e.g. fuss_camvid)")
    parser.add_argument("--clients", type=int, help="training clients (cityscapes: 3, 6 or 18; cocostuff: any)")
    parser.add_argument("--rounds", type=int, help="federation rounds")
    parser.add_argument("--local-steps", type=int, help="local steps per round (default: local epochs)")
    parser.add_argument("--local-epochs", type=float, help="local epochs per round when --local-steps is unset")
    parser.add_argument("--aggregator", choices=AGGREGATORS, help="centroid aggregation rule")
    parser.add_argument("--objective", choices=OBJECTIVES,
                        help="client objective (train.objective; docs/objectives.md), default stego")
    parser.add_argument("--unweighted", action="store_true", help="switch W off: uniform client weights")
    parser.add_argument("--no-average-head", action="store_true", help="switch E off: sites keep their own head")
    parser.add_argument("--no-aggregate-centroids", action="store_true",
                        help="switch C off: sites keep their own centroids")
    parser.add_argument("--fedprox-mu", type=float, help="FedProx mu (e.g. 0.001); 0 = off")
    parser.add_argument("--moon-weight", type=float, help="MOON contrastive weight (e.g. 1.0); 0 = off")
    parser.add_argument("--moon-tau", type=float, help="MOON temperature (default 0.5)")
    parser.add_argument("--min-clients", type=int, help="fewest accepted updates per round (default: all)")
    parser.add_argument("--seed", type=int, help="federation seed (initial model, k-means, maximin)")
    parser.add_argument("--data-root", help="data root written into the config (default: resolved per site)")
    parser.add_argument("--cache-dir", help="feature-cache folder written into the config (default: per site)")
    parser.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                        metavar="KEY=VALUE", help="any FussConfig override, e.g. --set train.lr_head=1e-4")
    parser.add_argument("--deploy-all", action="store_true",
                        help="deploy_map @ALL instead of the partition's site names (a federation whose FLARE "
                             "client names are not the partition's)")
    parser.add_argument("--resume-from", default="",
                        help="fuss_checkpoint.pt of an earlier run: continue after its last round (set --rounds to "
                             "the new total)")
    parser.add_argument("--record-updates", action="store_true",
                        help="server saves every received update (tensors) per round under received/ (audits, tests)")
    parser.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                        help="also send the run's metrics to MLflow (FLARE's MLflowReceiver, pip install "
                             "'.[tracking]'): a SQLite store mlflow.db in the job's result folder, or the tracking "
                             "server URI, e.g. http://mlflow.hospital.org:5000 (default: TensorBoard only)")
    parser.add_argument("--export-format", choices=EXPORT_FORMATS,
                        help="at the end of the run the server also writes the final model's deployable export "
                             "(fuss_segmenter.pt / .onnx + fuss_segmenter.json, as `fuss export`) beside "
                             "fuss_model.pt; the server needs the backbone weights (default: no export)")
    priv = parser.add_argument_group("privacy (docs/deployment.md)")
    priv.add_argument("--centroid-noise", type=float, metavar="SIGMA",
                      help="add CentroidPrivacyFilter: Gaussian noise of std SIGMA*C per centroid coordinate")
    priv.add_argument("--centroid-clip", type=float, metavar="C",
                      help="clip every centroid row to L2 norm C before it leaves a site (default 1 with noise)")
    priv.add_argument("--privacy-delta", type=float, default=DEFAULT_DELTA,
                      help="delta of the per-round (epsilon, delta) accounting in the audit log (default %(default)g)")
    priv.add_argument("--privacy-scope", default="",
                      help="privacy scope the job asks for (meta.json 'scope'; every site's privacy.json must "
                           "define it)")
    parser.add_argument("--server-param", dest="server_params", action="append", type=_override, default=[],
                        metavar="KEY=VALUE",
                        help="top-level FLARE setting of the server app, e.g. dead_client_grace_period=0 and "
                             "dead_client_check_lead_time=5 (how soon a dead site is given up; FLARE: 60 s, 30 s)")
    return parser


def config_from_args(args: argparse.Namespace) -> FussConfig:
    if args.preset:
        p = PRESETS[args.preset]
        if args.clients is not None and args.clients != p.clients and args.clients not in p.client_choices:
            raise ConfigError(f"--clients {args.clients} is not available for preset {args.preset!r} "
                              f"(choices: {sorted(set(p.client_choices) | {p.clients})})")
        cfg = preset_config(args.preset, args.clients)
    else:
        cfg = FussConfig.load(args.config)
    overrides = {
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.local_epochs": args.local_epochs,
        "federation.aggregator": args.aggregator,
        "train.objective": args.objective,
        "federation.min_clients": args.min_clients,
        "federation.seed": args.seed,
        "train.fedprox_mu": args.fedprox_mu,
        "train.moon_weight": args.moon_weight,
        "train.moon_tau": args.moon_tau,
        "data.root": args.data_root,
        "cache_dir": args.cache_dir,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.unweighted:
        overrides["federation.weighted"] = False
    if args.no_average_head:
        overrides["federation.average_head"] = False
    if args.no_aggregate_centroids:
        overrides["federation.aggregate_centroids"] = False
    overrides.update(dict(args.overrides))
    return cfg.with_overrides(overrides) if overrides else cfg


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """``fuss job export`` entry point: parsed args or an argv list (a leading "export" is skipped; "committed"
    regenerates the committed jobs). Returns the exit status: 0, or 2 for a bad configuration."""
    if not isinstance(args, argparse.Namespace):
        argv = list(sys.argv[1:] if args is None else args)
        if argv[:1] == ["committed"]:
            export_committed(*(argv[2:3] if argv[1:2] == ["--out"] else []))
            return 0
        if argv[:1] == ["export"]:
            argv = argv[1:]
        args = get_args_parser().parse_args(argv)
    try:
        export_from_args(args)
    except (ConfigError, OSError) as err:
        print(f"fuss job export: error: {err}", file=sys.stderr)
        return 2
    return 0


def export_from_args(args: argparse.Namespace) -> Path:
    """Export the job that ``args`` describe; prints the folder and the simulator command."""
    cfg = config_from_args(args)
    if args.preset:
        default = f"fuss_{args.preset}"
        name = args.name or (default if args.clients in (None, PRESETS[args.preset].clients)
                             else f"{default}_{args.clients}clients")
    else:
        name = args.name or Path(args.config).stem
    if args.centroid_noise is not None and args.centroid_noise < 0:
        raise ConfigError(f"--centroid-noise must be >= 0, got {args.centroid_noise}")
    if args.centroid_clip is not None and not args.centroid_clip > 0:
        raise ConfigError(f"--centroid-clip must be > 0, got {args.centroid_clip}")
    if not 0 < args.privacy_delta < 1:
        raise ConfigError(f"--privacy-delta must be in (0, 1), got {args.privacy_delta}")
    recipe = FussRecipe(cfg, name, preset=args.preset, record_updates=args.record_updates,
                        resume_from=str(Path(args.resume_from).resolve()) if args.resume_from else "",
                        centroid_clip=args.centroid_clip, centroid_noise=args.centroid_noise or 0.0,
                        privacy_delta=args.privacy_delta, server_params=dict(args.server_params),
                        export_format=args.export_format, privacy_scope=args.privacy_scope,
                        deploy_all=args.deploy_all, mlflow_uri=args.mlflow)
    recipe.export(args.out)
    path = Path(args.out) / name
    n = len(recipe.site_names)
    how = f"-t {n}" if n else "-n <sites> -t <sites>"
    print(f"exported {path}\nrun (from the repository root, whose simulator_workspace/ holds the class allow list): "
          f"nvflare simulator {path} {how}")
    return path


def export_committed(out: str | Path | None = None) -> Path:
    """Regenerate the committed job folders (default: ``jobs/`` of this repository)."""
    out = Path(out) if out else REPO_JOBS
    for preset in COMMITTED:
        export_from_args(get_args_parser().parse_args(["--preset", preset, "--out", str(out)]))
    return out


if __name__ == "__main__":
    sys.exit(main())
