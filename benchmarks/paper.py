"""The paper's comparisons on real data: every setting of its Tables 1-3, for several seeds, through FLARE.

    python -m benchmarks.paper --dataset camvid --budget reduced                  # 3 seeds -> docs/results, docs/figures
    python -m benchmarks.paper --dataset polyp --budget reduced --seeds 0 1 2
    python -m benchmarks.paper --dataset camvid --budget reduced --seeds 0 --verify   # re-run recorded runs: same numbers?
    python -m benchmarks.paper --dataset camvid --partition camvid-dir0.1:6 --budget full --crf-every 8 \
        --only local-only centralized FedAvg FedAvg+FedCC FedAvg+FedCC-maximin      # a label-skewed federation

Every federated setting runs through the real NVIDIA FLARE simulator: the job is exported with ``fuss job export``
and run with ``nvflare simulator`` in subprocesses (this module imports no FLARE code). The references that are
not federations (local-only, centralized, raw-feature k-means) run in-process with ``fuss_components.runner``.
Every final model is then evaluated here the same way, on the validation sites' whole images, without and with
dense CRF.

Settings (the paper's Tables 1-3): ``raw-kmeans``, ``local`` (mean, best and worst site), ``centralized``,
FedAvg / FedProx (mu 0.001) / FedMoon (weight 1, tau 0.5), each with FedAvg centroids and with FedCC-kmeans,
FedAvg + FedCC-maximin, and the W/E/C ablation (one switch off at a time) for FedAvg and FedCC-kmeans.

Per claim a verdict from the paired differences (:func:`verdict`); for FLARE runs also the centroid drift of every
round (``fuss_components.aggregation.centroid_drift``: how far the sites' centroids drift apart, index-wise and
matched, and how far FedAvg's and FedCC's aggregates differ), the label-free criteria per round, and the rounds
and uplink bytes until 95 % of the final validation mIoU (``benchmarks.selection.communication``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.selection import communication
from benchmarks.simulator import run_simulator
from fuss_components.backbones import backbone_caveat as library_backbone_caveat
from fuss_components.config import BackboneConfig, ConfigError, FussConfig, parse_overrides
from fuss_components.datasets import DataError
from fuss_components.evaluate import evaluate_model
from fuss_components.files import atomic_write_json, atomic_write_text
from fuss_components.metrics import image_weighted_mean
from fuss_components.presets import PRESETS, parse_partition_spec
from fuss_components.paths import cache_dir, data_root
from fuss_components.site import build_model, resolve_partition

log = logging.getLogger(__name__)


def backbone_caveat(block: int) -> str:
    """The caveat of the shared backbone (the benchmarks' default weights), naming the feature block."""
    return library_backbone_caveat(BackboneConfig(), block)

# Budgets: "full" is the paper's schedule; "reduced" finishes in about an hour per dataset on 2 CPU cores.
# crf_every: dense CRF on every k-th validation image (CRF costs about 0.3 s per image here, the rest is cached).
BUDGETS = {
    "full": {"rounds": 10, "local_steps": None, "local_epochs": 1.0, "crf_every": 1},
    "reduced": {"rounds": 3, "local_steps": 15, "local_epochs": 1.0, "crf_every": 4},
}
# The partition presets (fuss_components.presets.PRESETS) this benchmark is sized for and has recorded.
DATASETS = ("camvid", "polyp")
FEDPROX_MU, MOON_WEIGHT, MOON_TAU = 0.001, 1.0, 0.5
# The evaluation of one final model: what the tables show and what --verify compares.
VERIFY_KEYS = ("miou", "pixel_acc", "crf_miou", "crf_pixel_acc")  # the authors' baseline settings (spec, section 2)


@dataclass(frozen=True)
class Setting:
    """One row of the paper's tables."""

    name: str
    kind: str  # "flare" | "local" | "centralized" | "raw-kmeans"
    table: str = "main"  # "main" | "ablation"
    aggregator: str = "fedavg"
    regulariser: str = "none"  # "none" | "fedprox" | "fedmoon"
    weighted: bool = True  # W
    average_head: bool = True  # E
    aggregate_centroids: bool = True  # C

    @property
    def wec(self) -> str:
        return "".join(s if on else "-" for s, on in zip("WEC", (self.weighted, self.average_head,
                                                              self.aggregate_centroids)))

    def overrides(self) -> dict:
        out = {"federation.aggregator": self.aggregator, "federation.weighted": self.weighted,
               "federation.average_head": self.average_head,
               "federation.aggregate_centroids": self.aggregate_centroids}
        if self.regulariser == "fedprox":
            out["train.fedprox_mu"] = FEDPROX_MU
        elif self.regulariser == "fedmoon":
            out.update({"train.moon_weight": MOON_WEIGHT, "train.moon_tau": MOON_TAU})
        return out


def paper_settings() -> list[Setting]:
    rows = [Setting("raw-kmeans", "raw-kmeans"), Setting("local-only", "local"),
            Setting("centralized", "centralized")]
    for reg, label in (("none", "FedAvg"), ("fedprox", "FedProx"), ("fedmoon", "FedMoon")):
        rows.append(Setting(label, "flare", regulariser=reg))
        rows.append(Setting(f"{label}+FedCC", "flare", aggregator="fedcc-kmeans", regulariser=reg))
    rows.append(Setting("FedAvg+FedCC-maximin", "flare", aggregator="fedcc-maximin"))
    for agg, label in (("fedavg", "FedAvg"), ("fedcc-kmeans", "FedAvg+FedCC")):
        for switch, wec in (("weighted", "-EC"), ("average_head", "W-C"), ("aggregate_centroids", "WE-")):
            rows.append(Setting(f"{label} [{wec}]", "flare", "ablation", aggregator=agg, **{switch: False}))
    return rows


# ------------------------------------------------------------------------------------------- the FLARE path


def _sim_env(threads_per_site: int | None) -> dict:
    env = dict(os.environ)
    if threads_per_site:
        env["OMP_NUM_THREADS"] = str(threads_per_site)  # sites share the cores; see docs/reliability.md
    return env


@dataclass
class SimRun:
    """One finished ``nvflare simulator`` run."""

    workspace: Path
    seconds: float
    metrics: dict = field(default_factory=dict)
    restarts: list[str] = field(default_factory=list)  # start-up races the run was restarted after

    @property
    def app(self) -> Path:
        return self.workspace / "server" / "simulate_job" / "app_server"

    @property
    def model_file(self) -> Path:
        return self.app / "fuss_model.pt"


def simulate(cfg: FussConfig, work: Path, name: str, threads_per_site: int | None = None,
             timeout: float = 7200) -> SimRun:
    """Export ``cfg`` as a FLARE job (``fuss job export``) and run it in the simulator with one thread per site.

    Raises ``RuntimeError`` with the tail of the simulator's log when the job fails."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_file = work / f"{name}.json"
    cfg.save(cfg_file)
    export = subprocess.run([sys.executable, "-m", "fuss_components.cli", "job", "export", "--config",
                             str(cfg_file), "--out", str(work / "jobs"), "--name", name],
                            capture_output=True, text=True)
    if export.returncode != 0:
        raise RuntimeError(f"job export of {name} failed: {export.stderr[-2000:]}")
    partition = resolve_partition(cfg)
    n = len(set(partition.clients) | set(partition.validation))
    proc = run_simulator(work / "jobs" / name, work / "ws" / name, threads=n, env=_sim_env(threads_per_site),
                         timeout=timeout)  # the sites of the job's deploy_map, all at once
    run = SimRun(proc.workspace, proc.seconds, restarts=proc.restarts)
    if proc.returncode != 0 or not run.model_file.exists():
        raise RuntimeError(f"simulator run {name} failed (rc {proc.returncode}); workspace {proc.workspace}:\n"
                           f"{proc.output[-3000:]}")
    run.metrics = json.loads((run.app / "metrics.json").read_text())
    return run


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_state(cfg: FussConfig, model, crf_every: int, overlay_dir: Path | None = None,
                   num_overlays: int = 0) -> dict:
    """mIoU / pixel accuracy on all validation images, and after dense CRF on every ``crf_every``-th image
    (image-weighted over validation sites, like the runners' summaries)."""
    from fuss_components.runner import Run

    run = Run(cfg)
    plain, refined = {}, {}
    for site in run.validation_sites:
        site.cache.ensure(run.dataset, site.validation_ids, site.cache.eval_kinds, device=site.device,
                          desc=site.name)
        ids = site.cache.usable("eval", site.validation_ids)
        plain[site.name] = evaluate_model(model, run.dataset, ids, site.cache, run.num_clusters,
                                          overlay_dir=overlay_dir and overlay_dir / site.name,
                                          num_overlays=num_overlays)
        refined[site.name] = evaluate_model(model, run.dataset, ids[::crf_every], site.cache, run.num_clusters,
                                            crf=True)["crf"] | {"num_images": len(ids[::crf_every])}

    crf = image_weighted_mean(refined)
    return {**image_weighted_mean(plain), "crf_miou": crf["miou"], "crf_pixel_acc": crf["pixel_acc"],
            "crf_images": sum(m["num_images"] for m in refined.values()),
            "clusters_used": {n: m.get("clusters_used") for n, m in plain.items()}}


# Records written before pixel accuracy was called ``pixel_acc`` everywhere name it ``acc`` / ``crf_acc``.
_OLD_EVAL_NAMES = {"acc": "pixel_acc", "crf_acc": "crf_pixel_acc"}


def _eval_with_current_names(evaluation: dict) -> dict:
    return {_OLD_EVAL_NAMES.get(k, k): v for k, v in evaluation.items()}


def with_current_names(run: dict) -> dict:
    """A recorded run whose evaluations (and its sites', for local-only) use today's names; the record that was
    read is not changed, and a recorded file is never rewritten for the names alone."""
    out = dict(run)
    if "eval" in run:
        out["eval"] = _eval_with_current_names(run["eval"])
    if "sites" in run:
        out["sites"] = {name: _eval_with_current_names(e) for name, e in run["sites"].items()}
    return out


def _load_segmenter(path: Path, cfg: FussConfig):
    from fuss_components.checkpoint import read_model_file

    state, _, _ = read_model_file(path)
    model = build_model(cfg, state["centroids"].shape[0])
    model.load_state_dict(state)
    return model.eval(), state


# ------------------------------------------------------------------------------------------- the benchmark


def git_commit() -> str:
    """The repository's commit, ``-dirty`` when the code that makes the numbers (library, FLARE layer,
    benchmarks) differs from it; recorded with every run."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fuss_components", "custom", "benchmarks"],
                               capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def base_config(dataset: str, budget: dict, seed: int, overrides: dict | None = None,
                partition: str | None = None) -> FussConfig:
    """The dataset's preset configuration with the budget's schedule and ``seed`` for every random draw;
    ``partition``: another partition preset of the dataset (``camvid-dir0.1:6``), drawn with ``seed`` too."""
    if dataset not in DATASETS:
        raise ConfigError(f"bench paper: dataset must be one of {list(DATASETS)}, got {dataset!r}")
    partition = partition or dataset
    try:
        name = parse_partition_spec(partition).preset
    except DataError:
        name = None
    if name is None or PRESETS[name].dataset != PRESETS[dataset].dataset:
        known = sorted(p for p in PRESETS if PRESETS[p].dataset == PRESETS[dataset].dataset)
        raise ConfigError(f"bench paper: partition {partition!r} is not a preset of {dataset}; known: {known}")
    preset = PRESETS[name]
    cfg = FussConfig.from_dict({"data": {"dataset": preset.dataset}, "partition": partition,
                                "train": {"num_clusters": preset.num_clusters}})
    cfg = cfg.with_overrides({
        "data.root": str(data_root(cfg.data.root)), "cache_dir": str(cache_dir(cfg.cache_dir)),
        "federation.rounds": budget["rounds"], "federation.local_steps": budget["local_steps"],
        "federation.local_epochs": budget["local_epochs"], "federation.seed": seed, "train.seed": seed,
    })
    return cfg.with_overrides(overrides) if overrides else cfg


def result_stem(dataset: str, budget_name: str, tag: str = "") -> str:
    """``<dataset>[_<tag>]_<budget>``: the name of one benchmark variant's files (``paper_<stem>.json``, ``.md``,
    ``_records.json``, ``_verify.json``), figures (``<stem>_*.png``) and work folder. Budgets never share files,
    so a full-budget run cannot overwrite the tables of a reduced one."""
    return f"{dataset}_{tag}_{budget_name}" if tag else f"{dataset}_{budget_name}"


def partition_tag(dataset: str, partition: str | None) -> str:
    """The part of a result's name that names a partition other than the dataset's own preset:
    ``camvid-dir0.1:6`` -> ``dir0.1-6clients``; ``""`` for the dataset's preset."""
    if not partition or partition == dataset:
        return ""
    spec = parse_partition_spec(partition)
    name, clients = spec.preset, spec.clients
    label = name[len(dataset) + 1:] if name.startswith(dataset + "-") else name
    return f"{label}-{clients}clients" if clients else label


def folder_name(setting_name: str) -> str:
    """A setting's work folder: ``FedAvg+FedCC [-EC]`` -> ``FedAvg_FedCC_-EC``."""
    return setting_name.replace("+", "_").replace(" ", "").replace("[", "_").replace("]", "")


def _same_variant(run: dict, budget_name: str, overrides: dict | None, cfg: FussConfig) -> bool:
    """Same budget, overrides, feature block and flip averaging. Block and flip are compared as recorded (records
    from before the defaults moved hold block 8 and no flip averaging): ``--set backbone.block=8 --set
    data.eval_flip=false`` selects those, e.g. to ``--verify`` them."""
    def rest(o: dict | None) -> dict:
        return {k: v for k, v in (o or {}).items() if k not in ("backbone.block", "data.eval_flip")}
    return (run.get("budget") == budget_name and rest(run.get("overrides")) == rest(overrides)
            and run.get("block", 8) == cfg.backbone.block and run.get("eval_flip", False) == cfg.data.eval_flip)


def run_setting(setting: Setting, cfg: FussConfig, work: Path, crf_every: int, threads_per_site: int | None,
                overlays: int = 0) -> dict:
    """Train one setting for one seed and evaluate its final model(s); returns its record (no CRF and CRF)."""
    from fuss_components.runner import KMEANS_FILE, RawKMeans, run_centralized, run_local, run_raw_kmeans

    cfg = cfg.with_overrides(setting.overrides())
    started = time.perf_counter()
    out: dict = {"setting": setting.name}
    overlay_dir = work / "overlays" if overlays else None
    if setting.kind == "flare":
        sim = simulate(cfg, work, "job", threads_per_site)
        model, state = _load_segmenter(sim.model_file, cfg)
        out["eval"] = evaluate_state(cfg, model, crf_every, overlay_dir, overlays)
        out["curve"] = [r.get("val_miou") for r in sim.metrics["rounds"]]
        # per round: the sites' centroid drift, the label-free criteria of the round's model, its validation
        out["round_details"] = [{k: r.get(k) for k in ("round", "val_miou", "drift", "selection")}
                                for r in sim.metrics["rounds"]]
        out["communication"] = communication(sim.metrics)
        out["bytes_per_client_round"] = statistics.mean(
            e["bytes"] for r in sim.metrics["rounds"] for e in r["train"].values()
            if e.get("param_keys"))  # training updates (a validation-only site's result carries no parameters)
        out["centroids"] = state["centroids"].tolist()
        out["flare_seconds"] = sim.seconds
        if sim.restarts:
            out["simulator_restarts"] = sim.restarts
    elif setting.kind == "centralized":
        res = run_centralized(cfg, work, progress=False)
        model, state = _load_segmenter(work / "model.pt", cfg)
        out["eval"] = evaluate_state(cfg, model, crf_every, overlay_dir, overlays)
        out["curve"] = [r["miou"] for r in res["rounds"]]
        out["centroids"] = state["centroids"].tolist()
    elif setting.kind == "local":
        res = run_local(cfg, work, progress=False)
        out["sites"] = {}
        for name in sorted(res["sites"]):
            model, _ = _load_segmenter(work / name / "model.pt", cfg)
            out["sites"][name] = evaluate_state(cfg, model, crf_every)
        per = list(out["sites"].values())
        out["eval"] = {k: statistics.mean(e[k] for e in per) for k in VERIFY_KEYS}
        out["eval"].update({"miou_best": max(e["miou"] for e in per), "miou_worst": min(e["miou"] for e in per),
                            "crf_miou_best": max(e["crf_miou"] for e in per),
                            "crf_miou_worst": min(e["crf_miou"] for e in per)})
    elif setting.kind == "raw-kmeans":
        run_raw_kmeans(cfg, work, progress=False)
        centroids = torch.load(work / KMEANS_FILE, weights_only=True)
        out["eval"] = evaluate_state(cfg, RawKMeans(centroids), crf_every, overlay_dir, overlays)
    else:
        raise ValueError(setting.kind)
    out["seconds"] = time.perf_counter() - started
    return out


def bench_paper(dataset: str, out_dir: str | Path, work_dir: str | Path, seeds: list[int], budget_name: str,
                only: list[str] | None = None, overrides: dict | None = None,
                threads_per_site: int | None = 1, overlays: int = 2, tag: str = "", partition: str | None = None,
                crf_every: int | None = None) -> list[dict]:
    """Run every setting of :func:`paper_settings` (or those named in ``only``) for every seed; write one JSON
    record per (setting, seed, crf) to ``<out_dir>/paper_<stem>.json`` after each run (so an interrupted
    benchmark keeps its finished runs and a re-run skips them) and the tables to ``<out_dir>/paper_<stem>.md``,
    where ``stem`` is :func:`result_stem`. ``overrides`` (dotted config keys, e.g. another client objective)
    apply to every setting; give such a variant its own ``tag``. ``partition``: another partition preset of the
    dataset (its name joins the stem, :func:`partition_tag`); ``crf_every``: dense CRF on every k-th validation
    image instead of the budget's.
    """
    if budget_name not in BUDGETS:
        raise ConfigError(f"bench paper: budget must be one of {sorted(BUDGETS)}, got {budget_name!r}")
    budget = dict(BUDGETS[budget_name])
    if crf_every:
        budget["crf_every"] = crf_every
    tag = "_".join(t for t in (tag, partition_tag(dataset, partition)) if t)
    preset = dataset
    settings = paper_settings()
    if only:
        unknown = sorted(set(only) - {s.name for s in settings})
        if unknown:
            raise ConfigError(f"bench paper: unknown setting(s) {unknown}; known: {[s.name for s in settings]}")
        settings = [s for s in settings if s.name in only]
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = base_config(dataset, budget, seeds[0], overrides, partition).data.dataset  # overrides may name another
    stem = f"paper_{result_stem(dataset, budget_name, tag)}"
    results_file = out_dir / f"{stem}.json"
    done = json.loads(results_file.read_text()) if results_file.exists() else {"runs": []}

    variant = base_config(preset, budget, seeds[0], overrides, partition)
    runs = {(r["setting"], r["seed"]): with_current_names(r) for r in done["runs"]
            if _same_variant(r, budget_name, overrides, variant)}
    commit = git_commit()
    for seed in seeds:
        cfg = base_config(preset, budget, seed, overrides, partition)
        for setting in settings:
            if (setting.name, seed) in runs:
                log.info("bench paper: %s seed %d already done", setting.name, seed)
                continue
            safe = folder_name(setting.name)
            log.info("bench paper: %s, seed %d ...", setting.name, seed)
            result = run_setting(setting, cfg, work_dir / (stem[len("paper_"):]) / f"seed{seed}" / safe, budget["crf_every"],
                                 threads_per_site, overlays=overlays if seed == seeds[0] else 0)
            steps = cfg.federation.local_steps
            result.update({
                "dataset": dataset, "seed": seed, "budget": budget_name, "overrides": overrides or {},
                "kind": setting.kind, "table": setting.table, "strategy": setting.regulariser,
                "aggregator": setting.aggregator if setting.kind == "flare" else None, "wec": setting.wec,
                "regulariser": setting.regulariser, "rounds": cfg.federation.rounds,
                "local_steps": steps if steps else f"{cfg.federation.local_epochs} epoch(s)",
                "crf_every": budget["crf_every"], "commit": commit, "backbone": cfg.backbone.name,
                "partition": cfg.partition,
                "block": cfg.backbone.block, "eval_flip": cfg.data.eval_flip,
                "caveat": backbone_caveat(cfg.backbone.block),
            })
            runs[(setting.name, seed)] = result
            log.info("bench paper: %s seed %d: mIoU %.4f (CRF %.4f) in %.0f s", setting.name, seed,
                     result["eval"]["miou"], result["eval"]["crf_miou"], result["seconds"])
            done["runs"] = [r for r in done["runs"] if (r["setting"], r["seed"]) != (setting.name, seed)
                            or not _same_variant(r, budget_name, overrides, variant)] + [result]
            atomic_write_json(results_file, done, indent=1)  # an interrupted benchmark keeps what it recorded
    records = flat_records(list(runs.values()))
    atomic_write_json(out_dir / f"{stem}_records.json", records, indent=1)
    atomic_write_text(out_dir / f"{stem}.md", markdown_tables(list(runs.values()), dataset, budget_name, overrides))
    return records


def compare_runs(recorded: dict, rerun: dict, tolerance: float = 0.0) -> dict:
    """How a re-run of one (setting, seed) compares with its recorded run: the four evaluation figures and the
    per-round validation curve, the largest absolute difference, and whether it is within ``tolerance``."""
    diffs = {k: abs(rerun["eval"][k] - recorded["eval"][k]) for k in VERIFY_KEYS}
    curve_a, curve_b = recorded.get("curve") or [], rerun.get("curve") or []
    if len(curve_a) != len(curve_b):
        diffs["curve"] = float("inf")
    elif curve_a:
        diffs["curve"] = max(abs((a or 0.0) - (b or 0.0)) for a, b in zip(curve_a, curve_b))
    worst = max(diffs.values())
    return {"setting": recorded["setting"], "seed": recorded["seed"], "recorded_commit": recorded.get("commit"),
            "rerun_commit": rerun.get("commit"), "recorded": {k: recorded["eval"][k] for k in VERIFY_KEYS},
            "rerun": {k: rerun["eval"][k] for k in VERIFY_KEYS}, "abs_diff": diffs, "max_abs_diff": worst,
            "same": worst <= tolerance, "tolerance": tolerance, "rerun_seconds": rerun.get("seconds")}


def merge_checks(previous: dict | None, checks: list[dict]) -> list[dict]:
    """The checks of a verify file after this run: earlier checks of other (setting, seed) pairs are kept (so
    verifying seeds one at a time, or on another day, accumulates), a pair checked again is replaced."""
    previous = previous or {}
    new = {(c["setting"], c["seed"]) for c in checks}
    kept = [{"tolerance": previous.get("tolerance", 0.0)} | c for c in previous.get("checks", [])
            if (c["setting"], c["seed"]) not in new]
    return kept + checks


def verify_paper(dataset: str, out_dir: str | Path, work_dir: str | Path, seeds: list[int], budget_name: str,
                 only: list[str] | None = None, overrides: dict | None = None, threads_per_site: int | None = 1,
                 tag: str = "", tolerance: float = 0.0) -> list[dict]:
    """Run recorded settings again in fresh folders and compare with ``paper_<stem>.json`` (:func:`result_stem`).

    Only (setting, seed) pairs that are already recorded for this budget and variant are re-run; the records are
    left as they are. Writes ``<stem>_verify.json`` (one comparison per pair, see :func:`compare_runs`, merged with
    the file's earlier checks by :func:`merge_checks`); returns this run's comparisons."""
    if budget_name not in BUDGETS:
        raise ConfigError(f"bench paper: budget must be one of {sorted(BUDGETS)}, got {budget_name!r}")
    budget = BUDGETS[budget_name]
    first = base_config(dataset, budget, seeds[0], overrides)
    stem = f"paper_{result_stem(first.data.dataset, budget_name, tag)}"
    results_file = Path(out_dir) / f"{stem}.json"
    if not results_file.exists():
        raise ConfigError(f"bench paper --verify: nothing recorded yet in {results_file}")
    recorded = {(r["setting"], r["seed"]): with_current_names(r) for r in json.loads(results_file.read_text())["runs"]
                if _same_variant(r, budget_name, overrides, first)}
    wanted = [(s.name, seed) for seed in seeds for s in paper_settings() if not only or s.name in only]
    pairs = [p for p in wanted if p in recorded]
    if not pairs:
        raise ConfigError(f"bench paper --verify: none of the selected settings and seeds is recorded in "
                          f"{results_file}")
    settings = {s.name: s for s in paper_settings()}
    commit = git_commit()
    verify_file = Path(out_dir) / f"{stem}_verify.json"
    previous = json.loads(verify_file.read_text()) if verify_file.exists() else None
    checks = []
    for name, seed in pairs:
        cfg = base_config(dataset, budget, seed, overrides)
        safe = folder_name(name)
        log.info("bench paper --verify: %s, seed %d ...", name, seed)
        rerun = run_setting(settings[name], cfg, Path(work_dir) / "verify" / stem / f"seed{seed}" / safe,
                            budget["crf_every"], threads_per_site) | {"commit": commit}
        checks.append(compare_runs(recorded[(name, seed)], rerun, tolerance))
        log.info("bench paper --verify: %s seed %d: max |diff| %.2g (%s)", name, seed, checks[-1]["max_abs_diff"],
                 "same" if checks[-1]["same"] else "DIFFERENT")
        atomic_write_json(verify_file, {"command": "python -m benchmarks.paper --verify", "budget": budget_name,
                                        "checks": merge_checks(previous, checks)}, indent=1)
    return checks


def flat_records(runs: list[dict]) -> list[dict]:
    """One record per (setting, seed, crf): the fields the issue asks for."""
    keys = ("dataset", "setting", "kind", "table", "strategy", "aggregator", "regulariser", "wec", "seed",
            "rounds", "local_steps", "budget", "commit", "backbone", "block", "caveat")
    out = []
    for r in sorted(runs, key=lambda r: (r["setting"], r["seed"])):
        for crf in (False, True):
            e = r["eval"]
            rec = {k: r.get(k) for k in keys} | {"crf": crf, "miou": e["crf_miou" if crf else "miou"],
                                                  "pixel_acc": e["crf_pixel_acc" if crf else "pixel_acc"]}
            if crf:
                rec["crf_every"] = r.get("crf_every")
            out.append(rec)
    return out


def _mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _signed(diff: dict) -> str:
    return f"{diff['mean']:+.2f}" + (f" ± {diff['std']:.2f}" if diff["std"] is not None else "")


def summarize(runs: list[dict]) -> dict[str, dict]:
    """setting -> {metric: [value per seed]} in the order of :func:`paper_settings`."""
    order = [s.name for s in paper_settings()]
    table: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: (order.index(r["setting"]) if r["setting"] in order else 99, r["seed"])):
        row = table.setdefault(r["setting"], {"table": r["table"], "seeds": []})
        row["seeds"].append(r["seed"])
        for key, value in r["eval"].items():
            if isinstance(value, float):
                row.setdefault(key, []).append(value)
        if "flare_seconds" in r:
            row.setdefault("flare_seconds", []).append(r["flare_seconds"])
    return table


# The paper's relative claims as (claim, better setting, reference setting); tested with paired differences.
CLAIMS = (
    ("FedCC beats FedAvg", "FedAvg+FedCC", "FedAvg"),
    ("FedAvg beats local-only (mean)", "FedAvg", "local-only"),
    ("FedAvg+FedCC beats local-only (mean)", "FedAvg+FedCC", "local-only"),
    ("FedAvg+FedCC approaches or beats centralized", "FedAvg+FedCC", "centralized"),
    ("FedCC helps under FedProx", "FedProx+FedCC", "FedProx"),
    ("FedCC helps under FedMoon", "FedMoon+FedCC", "FedMoon"),
    ("FedProx helps FedAvg", "FedProx", "FedAvg"),
    ("FedMoon helps FedAvg", "FedMoon", "FedAvg"),
    ("FedCC-maximin matches FedCC-kmeans", "FedAvg+FedCC-maximin", "FedAvg+FedCC"),
    # Table 3: each switch on (the full setting) against the same strategy with that switch off
    *((f"{switch} helps {strategy}", strategy, f"{strategy} [{off}]")
      for strategy in ("FedAvg", "FedAvg+FedCC")
      for switch, off in (("W (sample weights)", "-EC"), ("E (averaged heads)", "W-C"),
                          ("C (aggregated centroids)", "WE-"))),
)


# "approaches" and "matches" claims hold within this many mIoU points on every seed
CLOSE_POINTS = 1.0
VERDICT_SEEDS = 3  # fewer paired seeds give no verdict


def verdict(diff: dict) -> str:
    """A claim's verdict from its paired differences: ``holds`` when every seed agrees with it, ``reversed`` when
    every seed contradicts it, ``not shown`` otherwise; ``open`` below :data:`VERDICT_SEEDS` seeds. "beats" claims
    need a positive difference on every seed; "approaches or beats" ones a difference above -:data:`CLOSE_POINTS`
    on every seed (``reversed``: below it on every seed); "matches" ones an absolute difference within :data:`CLOSE_POINTS` (``reversed``: outside it)."""
    d = diff["diffs"]
    if len(d) < VERDICT_SEEDS:
        return f"open ({len(d)} seed{'s' if len(d) != 1 else ''})"
    if "matches" in diff["claim"]:
        ok = [abs(x) <= CLOSE_POINTS for x in d]
    elif "approaches" in diff["claim"]:
        ok = [x > -CLOSE_POINTS for x in d]
    else:
        ok = [x > 0 for x in d]
    return "holds" if all(ok) else "reversed" if not any(ok) else "not shown"


def claim_differences(runs: list[dict], key: str = "miou") -> list[dict]:
    """For each of :data:`CLAIMS` whose two settings share seeds: the per-seed difference better - reference of
    ``key`` (paired by seed: same initialisation and data order), in points."""
    by = {(r["setting"], r["seed"]): r["eval"][key] for r in runs}
    out = []
    for claim, better, reference in CLAIMS:
        seeds = sorted(seed for name, seed in by if name == better and (reference, seed) in by)
        if seeds:
            diffs = [100 * (by[(better, s)] - by[(reference, s)]) for s in seeds]
            out.append({"claim": claim, "better": better, "reference": reference, "seeds": seeds, "diffs": diffs,
                        "mean": statistics.mean(diffs),
                        "std": statistics.stdev(diffs) if len(diffs) > 1 else None,
                        "positive": sum(d > 0 for d in diffs)})
            out[-1]["verdict"] = verdict(out[-1])
    return out


DRIFT_KEYS = ("site_indexwise_mean", "site_matched_mean", "site_matched_min", "fedavg_fedcc_mean",
              "fedavg_fedcc_min")


def drift_rows(runs: list[dict]) -> dict[str, list[dict]]:
    """FLARE setting -> per round ``{key: mean over seeds}`` of :data:`DRIFT_KEYS` (runs that recorded drift)."""
    out = {}
    for name in summarize(runs):
        per_seed = [r["round_details"] for r in runs if r["setting"] == name and r.get("round_details")
                    and all(d.get("drift") for d in r["round_details"])]
        if per_seed:
            rounds = min(len(d) for d in per_seed)
            out[name] = [{k: statistics.mean(d[i]["drift"][k] for d in per_seed) for k in DRIFT_KEYS
                          if all(k in d[i]["drift"] for d in per_seed)} | {"round": i, "seeds": len(per_seed)}
                         for i in range(rounds)]
    return out


def markdown_tables(runs: list[dict], dataset: str, budget_name: str, overrides: dict | None = None) -> str:
    table = summarize(runs)
    first = runs[0] if runs else {}
    commits = sorted({r.get("commit") for r in runs})
    variant = f", overrides `{json.dumps(overrides)}`" if overrides else ""
    steps = first.get("local_steps")
    schedule = f"{steps} local steps" if isinstance(steps, int) else f"{steps} of local training"
    every = first.get("crf_every")
    crf_images = "every validation image" if every == 1 else f"every {every}th validation image"
    lines = [f"### {dataset}: budget `{budget_name}` ({first.get('rounds')} rounds x {schedule}; CRF on {crf_images})"
             f"{variant}, commit {', '.join(f'`{c}`' for c in commits)}",
             "", f"> {backbone_caveat(first.get('block', 8))}.", "",
             "mIoU / pixel accuracy in %, mean ± standard deviation over seeds "
             f"{sorted({r['seed'] for r in runs})}.", ""]
    for name, title in (("main", "Tables 1-2: strategies"), ("ablation", "Table 3: W/E/C ablation")):
        if not any(row["table"] == name for row in table.values()):
            continue
        lines += [f"#### {title}", "", "| setting | mIoU | acc. | mIoU + CRF | acc. + CRF | seeds |",
                  "|---|---|---|---|---|---|"]
        for setting, row in table.items():
            if row["table"] != name:
                continue
            label = setting
            if "miou_best" in row:
                label += (f" (best {_mean_std(row['miou_best'])}, worst {_mean_std(row['miou_worst'])})")
            lines.append(f"| {label} | {_mean_std(row['miou'])} | {_mean_std(row['pixel_acc'])} | "
                         f"{_mean_std(row['crf_miou'])} | {_mean_std(row['crf_pixel_acc'])} | {len(row['seeds'])} |")
        lines.append("")
    plain, crf = claim_differences(runs, "miou"), {c["claim"]: c for c in claim_differences(runs, "crf_miou")}
    if plain:
        lines += ["#### The paper's claims: paired differences (mIoU points, same seed)", "",
                  f"Verdict (no CRF): *holds* when every seed agrees, *reversed* when every seed contradicts, *not "
                  f"shown* otherwise, *open* below {VERDICT_SEEDS} seeds; \"approaches\" / \"matches\" mean "
                  f"within {CLOSE_POINTS:g} point.", "",
                  "| claim | difference | with CRF | seeds with a positive difference (no CRF / CRF) | verdict |",
                  "|---|---|---|---|---|"]
        for c in plain:
            k = crf[c["claim"]]
            lines.append(f"| {c['claim']} ({c['better']} - {c['reference']}) | {_signed(c)} | {_signed(k)} | "
                         f"{c['positive']} / {k['positive']} of {len(c['seeds'])} | {c['verdict']} |")
        lines.append("")
    drift = drift_rows(runs)
    if drift:
        lines += ["#### Centroid drift per round (matched cosines, mean over seeds)", "",
                  "Between the sites' uploaded centroids: index-wise (centroid c with centroid c, what FedAvg "
                  "averages) and after a one-to-one matching (mean over site pairs; min: the worst-matched "
                  "centroid of any pair); and between the FedAvg and FedCC aggregates of the same uploads.", "",
                  "| setting | round | sites index-wise | sites matched | sites matched min | FedAvg vs FedCC | "
                  "FedAvg vs FedCC min | seeds |", "|---|---|---|---|---|---|---|---|"]
        for name, rows in drift.items():
            for row in rows:
                if row["round"] in (0, 1, len(rows) // 2, len(rows) - 1):
                    cells = " | ".join(f"{row[k]:.3f}" if k in row else "-" for k in DRIFT_KEYS)
                    lines.append(f"| {name} | {row['round']} | {cells} | {row['seeds']} |")
        lines.append("")
    comm = [(r["setting"], r["communication"]) for r in runs if r.get("communication")]
    if comm:
        lines += ["#### Communication: rounds and uplink until 95 % of the final validation mIoU (mean over seeds)",
                  "", "| setting | rounds | uplink MB (all sites) | seeds |", "|---|---|---|---|"]
        for name in table:
            got = [c for n, c in comm if n == name]
            if got:
                lines.append(f"| {name} | {statistics.mean(c['rounds'] for c in got):.1f} | "
                             f"{statistics.mean(c['uplink_bytes'] for c in got) / 2**20:.1f} | {len(got)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- figures


def figures(results_file: str | Path, fig_dir: str | Path, name: str | None = None) -> list[Path]:
    """PNG figures ``<name>_*.png`` from ``paper_<stem>.json``: validation mIoU per round per strategy, the centroid
    drift per round (runs that recorded it), a PCA projection and the cosine-similarity matrices of the global
    centroids of FedAvg vs FedCC (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [with_current_names(r) for r in json.loads(Path(results_file).read_text())["runs"]]
    dataset = name or runs[0]["dataset"]  # file prefix and title
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    seed0 = min(r["seed"] for r in runs)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in summarize(runs).items():
        curves = [r["curve"] for r in runs if r["setting"] == name and r.get("curve") and r["table"] == "main"]
        if not curves:
            continue
        curve = 100 * np.mean(np.array(curves, dtype=float), axis=0)
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    for name, style in (("local-only", "--"), ("raw-kmeans", ":")):  # no rounds: their final mIoU as a level
        finals = [r["eval"]["miou"] for r in runs if r["setting"] == name]
        if finals:
            ax.axhline(100 * statistics.mean(finals), color="grey", linestyle=style,
                       label=f"{name} (final{', mean of the sites' if name == 'local-only' else ''})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round (centralized: the same schedule per round on the pooled data)")
    ax.set_ylabel("validation mIoU (%), no CRF, mean over seeds")
    ax.set_title(f"{dataset}: validation mIoU per round")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    written.append(fig_dir / f"{dataset}_miou_per_round.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    drift = drift_rows(runs)
    if drift:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for name, rows in drift.items():
            x = [row["round"] for row in rows]
            line, = axes[0].plot(x, [row["site_matched_mean"] for row in rows], marker="o", label=f"{name}: matched")
            axes[0].plot(x, [row["site_indexwise_mean"] for row in rows], linestyle="--", color=line.get_color(),
                         label=f"{name}: index-wise")
            axes[1].plot(x, [row["fedavg_fedcc_mean"] for row in rows], marker="o", color=line.get_color(),
                         label=f"{name}: mean")
            axes[1].plot(x, [row["fedavg_fedcc_min"] for row in rows], linestyle=":", color=line.get_color(),
                         label=f"{name}: min")
        axes[0].set_title("sites' uploaded centroids: mean cosine over pairs", fontsize=10)
        axes[1].set_title("FedAvg vs FedCC aggregate of the same uploads", fontsize=10)
        axes[0].set_ylabel("cosine (mean over seeds)")
        for ax in axes:
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.suptitle(f"{dataset}: centroid drift per round")
        written.append(fig_dir / f"{dataset}_centroid_drift.png")
        fig.tight_layout()
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    pair = {r["setting"]: np.array(r["centroids"]) for r in runs
            if r["seed"] == seed0 and r["setting"] in ("FedAvg", "FedAvg+FedCC") and "centroids" in r}
    if len(pair) == 2:
        unit = {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in pair.items()}
        stacked = np.concatenate(list(unit.values()))
        centred = stacked - stacked.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = centred @ vt[:2].T
        fig, ax = plt.subplots(figsize=(5.5, 5))
        k = len(next(iter(unit.values())))
        for i, (name, marker) in enumerate(zip(unit, ("o", "^"))):
            pts = proj[i * k:(i + 1) * k]
            ax.scatter(pts[:, 0], pts[:, 1], marker=marker, s=60, label=name)
        ax.set_title(f"{dataset}: global centroids, PCA of both sets (seed {seed0})")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(fig_dir / f"{dataset}_centroids_pca.png")
        fig.tight_layout()
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, (name, u) in zip(axes, unit.items()):
            sim = u @ u.T
            off = sim[~np.eye(len(sim), dtype=bool)]
            im = ax.imshow(sim, vmin=-1, vmax=1, cmap="coolwarm")
            ax.set_title(f"{name}\nmean off-diagonal cos {off.mean():.2f}", fontsize=10)
        fig.colorbar(im, ax=axes, shrink=0.8)
        written.append(fig_dir / f"{dataset}_centroid_cosine.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def overlay_grid(work_dir: str | Path, dataset: str, seed: int, settings: list[str], fig_dir: str | Path,
                 per_setting: int = 2) -> Path | None:
    """Stack the saved overlays (image | prediction | label) of a few held-out images, one row per setting."""
    from PIL import Image, ImageDraw

    rows = []
    for name in settings:
        safe = folder_name(name)
        files = sorted((Path(work_dir) / dataset / f"seed{seed}" / safe / "overlays").rglob("*.png"))[:per_setting]
        if files:
            images = [Image.open(f).convert("RGB") for f in files]
            width = sum(i.width for i in images)
            row = Image.new("RGB", (width, images[0].height + 18), "white")
            x = 0
            for img in images:
                row.paste(img, (x, 18))
                x += img.width
            ImageDraw.Draw(row).text((4, 3), name, fill="black")
            rows.append(row)
    if not rows:
        return None
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height
    scale = min(1.0, 1200 / grid.width)
    grid = grid.resize((int(grid.width * scale), int(grid.height * scale)))
    path = Path(fig_dir) / f"{dataset}_overlays.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.quantize(colors=256).save(path, optimize=True)  # a palette PNG: a fifth of the size of an RGB one
    return path


# ------------------------------------------------------------------------------------------- command line


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper", add_help=add_help,
                                     description="The paper's Tables 1-3 through the FLARE simulator, and --verify.")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key of every setting, e.g. --set train.objective=smooseg "
                             "(repeatable; give such a variant a --tag)")
    parser.add_argument("--dataset", choices=DATASETS, default="camvid")
    parser.add_argument("--partition", default=None, metavar="PRESET[:CLIENTS]",
                        help="another partition preset of the dataset, e.g. camvid-dir0.1:6 (fuss partition --help "
                             "lists them; drawn with each seed); results go to paper_<dataset>_<preset>-<N>clients_"
                             "<budget>.*")
    parser.add_argument("--crf-every", type=int, default=None, metavar="K",
                        help="dense CRF on every K-th validation image instead of the budget's")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="full: 10 rounds x 1 local epoch, CRF on every image; reduced: 3 rounds x 15 steps, "
                             "CRF on every 4th validation image (about an hour for camvid on 2 cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", metavar="SETTING", help="run only these settings (names as in the tables)")
    parser.add_argument("--out", default="docs/results",
                        help="folder for paper_<dataset>[_<tag>]_<budget>.json / .md / _records.json (default %(default)s)")
    parser.add_argument("--figures", default="docs/figures", help="folder for the PNG figures (default %(default)s)")
    parser.add_argument("--work", default="runs/bench_paper", help="folder for jobs, workspaces and models")
    parser.add_argument("--tag", default="", help="name of a variant (e.g. with --set train.objective=smooseg): "
                                                  "results go to paper_<dataset>_<tag>_<budget>.*")
    parser.add_argument("--verify", action="store_true",
                        help="run the recorded settings and seeds again in fresh folders and compare with the records "
                             "(writes paper_<dataset>[_<tag>]_<budget>_verify.json; the records are not changed; "
                             "exit code 1 if any differ)")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="with --verify: largest absolute difference (fraction, 1e-4 = 0.01 mIoU points) counted "
                             "as the same (default 0: bit-identical figures)")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = parse_overrides(args.set)
    if args.verify:
        checks = verify_paper(args.dataset, args.out, args.work, args.seeds, args.budget, args.only, overrides,
                              tag=args.tag, tolerance=args.tolerance)
        for c in checks:
            print(f"{c['setting']:<24} seed {c['seed']}: mIoU {100 * c['recorded']['miou']:.4f} recorded "
                  f"({c['recorded_commit']}), {100 * c['rerun']['miou']:.4f} now; max |diff| {c['max_abs_diff']:.2g}"
                  f" -> {'same' if c['same'] else 'DIFFERENT'}")
        return 0 if all(c["same"] for c in checks) else 1
    if args.partition and args.verify:
        raise ConfigError("bench paper: --verify does not take --partition")
    records = bench_paper(args.dataset, args.out, args.work, args.seeds, args.budget, args.only, overrides,
                          tag=args.tag, partition=args.partition, crf_every=args.crf_every)
    tag = "_".join(t for t in (args.tag, partition_tag(args.dataset, args.partition)) if t)
    stem = result_stem(records[0]["dataset"], args.budget, tag)
    written = figures(Path(args.out) / f"paper_{stem}.json", args.figures, stem)
    grid = overlay_grid(args.work, stem, args.seeds[0], ["raw-kmeans", "centralized", "FedAvg", "FedAvg+FedCC"],
                        args.figures)
    print(Path(args.out, f"paper_{stem}.md").read_text())
    print("figures:", *[str(p) for p in written + ([grid] if grid else [])])
    return 0


def run_command(parser: argparse.ArgumentParser, main_fn, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run ``main_fn``; a configuration or input error ends with its message and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return main_fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # ConfigError is a ValueError
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_command(get_args_parser(), main))
