"""The one Python definition of every FUSS FLARE job, and the generator of the committed job folders.

    python -m fuss_flare.job export --preset camvid --rounds 5 --local-steps 50 --aggregator fedcc-kmeans --out DIR
    fuss job export --preset cityscapes --clients 6 --fedprox-mu 0.001 --out DIR
    fuss job export --preset camvid --objective smooseg --out DIR     # client objective (docs/objectives.md)
    python -m fuss_flare.job committed --out jobs        # regenerate jobs/fuss_{camvid,cityscapes,polyp,cocostuff}

A job folder holds one app for the server and all clients: ``config_fed_server.json`` (FussController,
FussAggregator, FussModelPersistor, FullModelShareableGenerator, TBAnalyticsReceiver), ``config_fed_client.json``
(ClientAPIExecutor running ``fuss_flare/client.py`` in-process, ConvertToFedEvent, FussResultFilter), and in
``custom/`` the ``fuss_flare`` package plus ``fuss_config.json`` (the FussConfig of the run). Sites need
``fuss_components`` installed (``pip install -e <clone>``); nothing else is site-specific in the folder: the data
root and cache come from ``$FUSS_DATA_ROOT`` / ``$FUSS_CACHE_DIR`` / ``$FUSS_SITE_CONFIG`` or ``../shared``.

Run with ``nvflare simulator <job> -w <workspace> -n <clients> -t <threads>``, where ``-n`` counts training sites
plus validation-only sites (simulator names ``site-N`` map to the partition's sites in that order); on a POC or
provisioned federation with ``nvflare job submit`` or ``poc/run.sh`` (``docs/deployment.md``).

Privacy options: ``--centroid-noise SIGMA --centroid-clip C`` add ``CentroidPrivacyFilter`` after
``FussResultFilter``; ``--privacy-scope NAME`` asks the sites for a scope of their ``privacy.json``;
``--server-param KEY=VALUE`` sets FLARE server settings such as ``dead_client_grace_period``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fuss_components.config import AGGREGATORS, OBJECTIVES, ConfigError, FussConfig
from fuss_flare import ALL_TASKS, CONFIG_FILE

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Preset:
    job: str  # job folder name
    dataset: str
    partition: str  # preset name of fuss_components.partition
    clusters: int
    clients: int  # default number of training sites
    validation_only: int  # validation sites that are not training sites (simulator -n = clients + this)
    note: str
    client_choices: tuple[int, ...] = ()  # allowed --clients values (empty: fixed)


PRESETS = {
    "camvid": Preset("fuss_camvid", "camvid", "camvid", 11, 3, 1,
                     "CamVid by sequence: clients 0001TP, 0006R0, 0016E5; Seq05VD held out for validation"),
    "cityscapes": Preset("fuss_cityscapes", "cityscapes", "cityscapes", 27, 3, 1,
                         "Cityscapes by city (18 training cities in 3, 6 or 18 clients); the 3 val cities validate",
                         (3, 6, 18)),
    "polyp": Preset("fuss_polyp", "polyp", "polyp", 2, 2, 0,
                    "kvasir and cvc_clinicdb hospitals; each validates on its PraNet test list"),
    "cocostuff": Preset("fuss_cocostuff", "cocostuff27", "cocostuff27", 27, 18, 1,
                        "COCO-Stuff-27, Dirichlet(0.5) over 18 clients; val2017 (curated) validates",
                        tuple(range(1, 101))),
}


def preset_config(preset: str, clients: int | None = None) -> FussConfig:
    """Default FussConfig of a preset (spec defaults; |C| explicit so the server never needs the data)."""
    p = PRESETS[preset]
    partition = p.partition if clients in (None, p.clients) else f"{p.partition}:{clients}"
    return FussConfig.from_dict(
        {"data": {"dataset": p.dataset}, "partition": partition, "train": {"num_clusters": p.clusters}}
    )


def build_job(
    cfg: FussConfig,
    name: str,
    num_training_sites: int | None = None,
    validate_every: int = 1,
    task_request_interval: float = 0.2,
    record_updates: bool = False,
    resume_from: str = "",
    centroid_clip: float | None = None,
    centroid_noise: float = 0.0,
    privacy_delta: float = 1e-5,
    privacy_scope: str = "",
    server_params: dict | None = None,
):
    """A FedJob running ``cfg`` (rounds, aggregator, FedProx / MOON, E/C/W switches all come from ``cfg``).

    ``num_training_sites`` (the partition's training sites, when known at export time) is the minimum used when
    ``federation.min_clients`` is unset: FLARE's deployment minimum (``min_clients`` in meta.json) and the
    controller's (fewer training sites answering ``site_info`` fails the job, e.g. a site started with a wrong data
    path). The controller discovers the sites' roles at run time.

    Privacy (see ``docs/deployment.md``): ``centroid_clip`` / ``centroid_noise`` add ``CentroidPrivacyFilter``
    (clip each centroid row to norm C, add N(0, (sigma C)^2)) to the train results after ``FussResultFilter``;
    ``privacy_scope`` names the sites' ``privacy.json`` scope the job asks for (meta.json ``scope``; a site
    without that scope refuses the job). ``server_params``: top-level FLARE settings of the server app, e.g.
    ``{"dead_client_grace_period": 0, "dead_client_check_lead_time": 5}`` (how soon a site that died is treated as
    gone: FLARE waits 60 s and 30 s by default).
    """
    from nvflare.job_config.defs import FilterType
    from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
    from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
    from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
    from nvflare.client.config import ExchangeFormat
    from nvflare.job_config.api import FedJob

    from fuss_flare.aggregator import FussAggregator
    from fuss_flare.controller import FussController
    from fuss_flare.filters import CentroidPrivacyFilter, FussResultFilter
    from fuss_flare.persistor import FussModelPersistor

    fed = cfg.federation
    deploy_min = fed.min_clients or num_training_sites or 1
    job = FedJob(name=name, min_clients=deploy_min)

    # server
    job.to_server(
        FussController(
            min_clients=deploy_min,  # unset federation.min_clients: every training site of the partition
            num_rounds=fed.rounds,
            validate_every=validate_every,
            record_updates=record_updates,
            resume_from=resume_from,
        ),
        id="controller",
    )
    job.to_server(FussAggregator(config_file=CONFIG_FILE), id="aggregator")
    job.to_server(FussModelPersistor(config_file=CONFIG_FILE), id="persistor")
    job.to_server(FullModelShareableGenerator(), id="shareable_generator")
    job.to_server(TBAnalyticsReceiver(), id="tb_receiver")
    job.to_server({"server": {"task_request_interval": task_request_interval}})
    if server_params:
        job.to_server(dict(server_params))

    # clients
    executor = ClientAPIExecutor(
        execution_mode="in_process",
        task_script_path="fuss_flare/client.py",
        task_script_args=f"--config {CONFIG_FILE}",
        params_exchange_format=ExchangeFormat.PYTORCH,
        server_expected_format=ExchangeFormat.PYTORCH,
    )
    job.to_clients(executor, id="executor", tasks=list(ALL_TASKS))
    job.to_clients(ConvertToFedEvent(events_to_convert=["analytix_log_stats"]), id="event_to_fed")
    job.to_clients(FussResultFilter(), filter_type=FilterType.TASK_RESULT, tasks=list(ALL_TASKS))
    if centroid_clip is not None or centroid_noise:
        job.to_clients(
            CentroidPrivacyFilter(clip=centroid_clip or 1.0, noise_multiplier=centroid_noise, delta=privacy_delta,
                                  rounds=fed.rounds),
            filter_type=FilterType.TASK_RESULT, tasks=list(ALL_TASKS),  # one chain per task set; acts on WEIGHTS only
        )

    # code and configuration shipped with the job (BYOC): the package (clean copy) and the run's config
    staging = Path(tempfile.mkdtemp(prefix="fuss_job_"))
    shutil.copytree(PACKAGE_DIR, staging / "fuss_flare", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cfg.save(staging / CONFIG_FILE)
    for add in (job.add_file_to_server, job.add_file_to_clients):
        add(str(staging / "fuss_flare"), dest_dir="fuss_flare")
        add(str(staging / CONFIG_FILE))
    job._fuss_staging = staging  # removed by export()
    job._fuss_meta = {"scope": privacy_scope} if privacy_scope else {}  # merged into meta.json by export()
    return job


def export(job, out_dir: str | Path) -> Path:
    """Write the job folder ``<out_dir>/<job name>`` (replacing an older export) and return its path."""
    out_dir = Path(out_dir)
    target = out_dir / job.name
    if target.exists():
        shutil.rmtree(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        job.export_job(str(out_dir))
    finally:
        staging = getattr(job, "_fuss_staging", None)
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    for junk in target.rglob("__pycache__"):
        shutil.rmtree(junk, ignore_errors=True)
    extra_meta = getattr(job, "_fuss_meta", None)
    if extra_meta:
        meta = json.loads((target / "meta.json").read_text())
        meta.update(extra_meta)
        (target / "meta.json").write_text(json.dumps(meta, indent=4))
    for config in target.glob("*/config/config_fed_*.json"):  # FLARE keeps filter task lists in a set: sort them
        data = json.loads(config.read_text())
        for section in ("task_result_filters", "task_data_filters"):
            for entry in data.get(section, []):
                entry["tasks"] = sorted(entry["tasks"])
        config.write_text(json.dumps(data, indent=4))
    return target


def count_sites(cfg: FussConfig, preset: str | None = None) -> tuple[int | None, int | None]:
    """(training sites, all sites) of the run's partition: the simulator's ``-n`` is the second number.

    Presets and manifests are counted offline; any other partition (e.g. ``site``) is resolved from the data when
    it is reachable here, else ``(None, None)``.
    """
    if preset:
        p = PRESETS[preset]
        _, _, count = cfg.partition.partition(":")
        train = int(count) if count else p.clients
        return train, train + p.validation_only
    try:
        spec = Path(cfg.partition)
        if spec.suffix == ".json" and spec.is_file():
            manifest = json.loads(spec.read_text())
            clients, validation = list(manifest["clients"]), list(manifest.get("validation", {}))
        else:
            from fuss_components.site import resolve_partition

            part = resolve_partition(cfg)
            clients, validation = list(part.clients), list(part.validation)
    except Exception:
        return None, None
    return len(clients), len(clients) + len([s for s in validation if s not in clients])


# ---------------------------------------------------------------------------------------------- command line


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuss job export",
        description="Export a FUSS NVIDIA FLARE job folder (run it with `nvflare simulator DIR/NAME -w WS -n N`).",
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
    parser.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                        metavar="KEY=VALUE", help="any FussConfig override, e.g. --set train.lr_head=1e-4")
    parser.add_argument("--validate-every", type=int, default=1, help="validate every N rounds (0: only the last)")
    parser.add_argument("--task-request-interval", type=float, default=0.2,
                        help="seconds between a client's task polls (FLARE's default is 2)")
    parser.add_argument("--resume-from", default="",
                        help="fuss_checkpoint.pt of an earlier run: continue after its last round (set --rounds to "
                             "the new total)")
    parser.add_argument("--record-updates", action="store_true",
                        help="server saves every received update (tensors) per round under received/ (audits, tests)")
    priv = parser.add_argument_group("privacy (docs/deployment.md)")
    priv.add_argument("--centroid-noise", type=float, metavar="SIGMA",
                      help="add CentroidPrivacyFilter: Gaussian noise of std SIGMA*C per centroid coordinate")
    priv.add_argument("--centroid-clip", type=float, metavar="C",
                      help="clip every centroid row to L2 norm C before it leaves a site (default 1 with noise)")
    priv.add_argument("--privacy-delta", type=float, default=1e-5,
                      help="delta of the per-round (epsilon, delta) accounting in the audit log (default 1e-5)")
    priv.add_argument("--privacy-scope", default="",
                      help="privacy scope the job asks for (meta.json 'scope'; every site's privacy.json must "
                           "define it)")
    parser.add_argument("--server-param", dest="server_params", action="append", type=_parse_override, default=[],
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
        p = PRESETS[args.preset]
        default = p.job if args.clients in (None, p.clients) else f"{p.job}_{args.clients}clients"
        name = args.name or default
    else:
        name = args.name or Path(args.config).stem
    n_train, n = count_sites(cfg, args.preset)
    if args.centroid_noise is not None and args.centroid_noise < 0:
        raise ConfigError(f"--centroid-noise must be >= 0, got {args.centroid_noise}")
    if args.centroid_clip is not None and not args.centroid_clip > 0:
        raise ConfigError(f"--centroid-clip must be > 0, got {args.centroid_clip}")
    if not 0 < args.privacy_delta < 1:
        raise ConfigError(f"--privacy-delta must be in (0, 1), got {args.privacy_delta}")
    job = build_job(cfg, name, num_training_sites=n_train, validate_every=args.validate_every,
                    task_request_interval=args.task_request_interval, record_updates=args.record_updates,
                    resume_from=str(Path(args.resume_from).resolve()) if args.resume_from else "",
                    centroid_clip=args.centroid_clip, centroid_noise=args.centroid_noise or 0.0,
                    privacy_delta=args.privacy_delta, privacy_scope=args.privacy_scope,
                    server_params=dict(args.server_params))
    path = export(job, args.out)
    hint = f"-n {n} -t {min(n, 4)}" if n else "-n <training + validation-only sites>"
    print(f"exported {path}\nrun: nvflare simulator {path} -w workspaces/{name} {hint}")
    return path


def export_committed(out: str | Path | None = None) -> Path:
    """Regenerate the committed job folders (default: ``jobs/`` of this repository)."""
    out = Path(out) if out else PACKAGE_DIR.parents[1] / "jobs"
    for preset in ("camvid", "cityscapes", "polyp", "cocostuff"):
        export_from_args(get_args_parser().parse_args(["--preset", preset, "--out", str(out)]))
    return out


if __name__ == "__main__":
    sys.exit(main())
