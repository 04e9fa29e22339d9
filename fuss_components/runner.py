"""In-process reference runs: local-only, centralized, and a federation that calls the same Site, LocalTrainer
and aggregation functions as the FLARE jobs (so the two can be compared number for number)."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from tqdm.auto import tqdm

from .aggregation import AggregationError, ClientUpdate, aggregate, centroid_drift
from .screening import screen_updates
from .checkpoint import save_model
from .config import FussConfig
from .files import atomic_torch_save, atomic_write_json
from .head import join_state, split_state
from .metrics import image_weighted_mean
from .partition import Partition
from .site import Site, init_global_state, open_site_dataset, resolve_partition
from .trainer import stable_seed

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
KMEANS_FILE = "kmeans_centroids.pt"


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data, default=float)


class Run:
    """Sites of one run, built once: training sites and validation sites share caches and trainers."""

    def __init__(self, cfg: FussConfig, partition: Partition | None = None):
        self.cfg = cfg
        self.dataset = open_site_dataset(cfg)
        self.partition = partition or resolve_partition(cfg, self.dataset)
        names = list(self.partition.clients) + [s for s in self.partition.validation if s not in self.partition.clients]
        self.sites = {name: Site(cfg, name, self.partition, self.dataset) for name in names}
        self.train_sites = [self.sites[n] for n in sorted(self.partition.clients)]
        self.validation_sites = [self.sites[n] for n in sorted(self.partition.validation)]
        self.num_clusters = next(iter(self.sites.values())).num_clusters

    def check_data(self, kinds: tuple[str, ...] = ("train", "eval")) -> None:
        """Every site's checks of its files (``Site.check_data``), before any site extracts or trains."""
        for site in self.sites.values():
            site.check_data(kinds)

    def validate(self, state: dict[str, torch.Tensor], crf: bool = False, overlay_dir: Path | None = None,
                 num_overlays: int = 0, progress: bool = False) -> dict[str, dict]:
        return {s.name: s.validate(state, crf=crf, overlay_dir=overlay_dir and overlay_dir / s.name,
                                   num_overlays=num_overlays, progress=progress) for s in self.validation_sites}

    def skipped_images(self) -> dict[str, dict[str, str]]:
        """``{site: {image id: reason}}`` of the images left out as bad (``data.on_bad_image="skip"``)."""
        return {name: site.skipped_images for name, site in self.sites.items() if site.skipped_images}


def summary_metrics(per_site: dict[str, dict]) -> dict[str, float | None]:
    """mIoU and pixel accuracy over all validation sites' images; None without a validation site (a federation of
    unlabeled sites trains and saves its model all the same)."""
    if not per_site:
        return {"miou": None, "pixel_acc": None}
    return image_weighted_mean(per_site, ("miou", "pixel_acc"))


def _training_bar(total: int, desc: str, unit: str, progress: bool) -> tqdm:
    """The progress bar of a run's local training; used as a context manager, so that an error closes it and is
    printed on its own line."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress)


def run_federated(cfg: FussConfig, out_dir: str | Path, crf: bool = False, progress: bool = True) -> dict:
    """Algorithm 1 in one process: every round each training site trains from the global model, the updates
    are screened and aggregated, and the validation sites evaluate the new global model."""
    out_dir = Path(out_dir)
    run = Run(cfg)
    cfg.check_sites(len(run.train_sites))  # no training site, min_clients > sites: fail before any work
    run.check_data()
    fed = cfg.federation
    min_clients = fed.min_clients or len(run.train_sites)
    state = init_global_state(cfg, run.num_clusters)
    history, started = [], time.perf_counter()
    with _training_bar(fed.rounds * len(run.train_sites), "federated training", "site-round", progress) as bar:
        for round_idx in range(fed.rounds):
            updates = []
            for site in run.train_sites:
                bar.set_postfix_str(f"round {round_idx + 1}/{fed.rounds}, site {site.name}")
                result = site.train(state, round_idx)
                bar.update()
                head, centroids = split_state(result.state)
                updates.append(ClientUpdate(site.name, head, centroids, result.num_samples, result.metrics))
            reference, centroids = split_state(state)
            accepted, rejected = screen_updates(updates, reference, run.num_clusters, centroids.shape[1],
                                                federation=fed, reject_all_duplicates=True,
                                                declared_counts={s.name: s.num_samples for s in run.train_sites},
                                                round_steps={s.name: cfg.round_steps(s.num_samples)
                                                             for s in run.train_sites})
            for site_name, reason in rejected:
                log.warning("round %d: rejected update of %s: %s", round_idx, site_name, reason)
            if len(accepted) < min_clients:
                raise AggregationError(f"round {round_idx}: {len(accepted)} usable updates, "
                                       f"min_clients={min_clients}")
            state = join_state(*aggregate(accepted, fed, run.num_clusters, reference_head=reference))
            validation = run.validate(state)
            record = {"round": round_idx, "train": {u.site: u.metrics for u in updates},
                      "rejected": dict(rejected), "drift": centroid_drift(accepted, fed, run.num_clusters),
                      "validation": validation, **summary_metrics(validation)}
            history.append(record)
            if progress:
                log.info("round %d/%d: validation mIoU %s acc %s", round_idx + 1, fed.rounds, _fmt(record["miou"]),
                         _fmt(record["pixel_acc"]))
    final = run.validate(state, crf=crf, overlay_dir=out_dir / "overlays", num_overlays=4, progress=progress)
    result = {"mode": "federated", "rounds": history, "final": final, **summary_metrics(final),
              "seconds": time.perf_counter() - started}
    save_model(out_dir / MODEL_FILE, state, cfg, rounds=fed.rounds)
    finish_run(out_dir, cfg, result, run)
    return result


def run_local(cfg: FussConfig, out_dir: str | Path, crf: bool = False, progress: bool = True) -> dict:
    """Local-only reference: every training site trains alone for the same rounds and steps, and each local
    model is evaluated on the validation sites. Reports mean, best and worst site."""
    out_dir = Path(out_dir)
    run = Run(cfg)
    run.check_data()
    initial = init_global_state(cfg, run.num_clusters)
    per_site, started = {}, time.perf_counter()
    rounds = cfg.federation.rounds
    with _training_bar(len(run.train_sites) * rounds, "local training", "site-round", progress) as bar:
        for site in run.train_sites:
            state = initial
            for round_idx in range(rounds):
                bar.set_postfix_str(f"site {site.name}, round {round_idx + 1}/{rounds}")
                state = site.train(state, round_idx).state
                bar.update()
            save_model(out_dir / site.name / MODEL_FILE, state, cfg)
            per_site[site.name] = {"validation": run.validate(state, crf=crf)}
            per_site[site.name].update(summary_metrics(per_site[site.name]["validation"]))
            if progress:
                log.info("local %s: validation mIoU %s", site.name, _fmt(per_site[site.name]["miou"]))
    mious = [v["miou"] for v in per_site.values() if v["miou"] is not None]
    accs = [v["pixel_acc"] for v in per_site.values() if v["pixel_acc"] is not None]
    result = {"mode": "local", "sites": per_site, "miou": statistics.mean(mious) if mious else None,
              "miou_best": max(mious, default=None), "miou_worst": min(mious, default=None),
              "pixel_acc": statistics.mean(accs) if accs else None, "seconds": time.perf_counter() - started}
    finish_run(out_dir, cfg, result, run)
    return result


def pooled_partition(partition: Partition, name: str = "centralized") -> Partition:
    """All training sites' images as one client (validation unchanged)."""
    ids = [i for site in sorted(partition.clients) for i in partition.clients[site]]
    return Partition(dataset=partition.dataset, strategy="pooled", seed=partition.seed,
                     num_classes=partition.num_classes, clients={name: ids}, validation=dict(partition.validation),
                     meta={"pooled_from": sorted(partition.clients)})


def run_centralized(cfg: FussConfig, out_dir: str | Path, crf: bool = False, progress: bool = True) -> dict:
    """Centralized reference: all training sites' data pooled in one trainer, same rounds x local epochs."""
    out_dir = Path(out_dir)
    run = Run(cfg, pooled_partition(resolve_partition(cfg)))
    run.check_data()
    site = run.train_sites[0]
    state = init_global_state(cfg, run.num_clusters)
    history, started = [], time.perf_counter()
    rounds = cfg.federation.rounds
    with _training_bar(rounds, "centralized training", "round", progress) as bar:
        for round_idx in range(rounds):
            result = site.train(state, round_idx)
            bar.update()
            state = result.state
            validation = run.validate(state)
            history.append({"round": round_idx, "train": result.metrics, "validation": validation,
                            **summary_metrics(validation)})
            if progress:
                log.info("centralized epoch-round %d/%d: validation mIoU %s (clusters used %d)", round_idx + 1,
                         rounds, _fmt(history[-1]["miou"]), result.metrics["clusters_used"])
    final = run.validate(state, crf=crf, overlay_dir=out_dir / "overlays", num_overlays=4, progress=progress)
    out = {"mode": "centralized", "rounds": history, "final": final, **summary_metrics(final),
           "seconds": time.perf_counter() - started}
    save_model(out_dir / MODEL_FILE, state, cfg)
    finish_run(out_dir, cfg, out, run)
    return out


class RawKMeans:
    """The floor: k-means on L2-normalised raw backbone features (no head); predicts by cosine."""

    def __init__(self, centroids: torch.Tensor):
        self.centroids = F.normalize(centroids, dim=1)

    def cluster_logits(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bdhw,cd->bchw", F.normalize(feats.float(), dim=1), self.centroids)


def fit_kmeans(vectors: np.ndarray, k: int, n_init: int, seed: int, progress: bool = True) -> np.ndarray:
    """The centres of sklearn's ``KMeans(k, n_init=n_init, random_state=seed)``, one initialisation at a time
    behind a progress bar: the initialisations draw from one ``RandomState(seed)`` in sklearn's order, and a run
    replaces the best one as in sklearn (lower inertia and a different clustering), so the centres are sklearn's."""
    draws = np.random.RandomState(seed)
    best = None
    with tqdm(total=n_init, desc=f"raw k-means ({len(vectors)} vectors, {k} clusters)", unit="init",
              disable=not progress) as bar:
        for _ in range(n_init):
            run = KMeans(k, n_init=1, random_state=draws).fit(vectors)
            if best is None or (run.inertia_ < best.inertia_ and not _same_clustering(run.labels_, best.labels_)):
                best = run
            bar.update()
    return best.cluster_centers_


def _same_clustering(labels: np.ndarray, other: np.ndarray) -> bool:
    """Whether every cluster of ``labels`` lies inside one cluster of ``other`` (sklearn's test of a rerun)."""
    pairs = labels.astype(np.int64) * (int(other.max()) + 1) + other
    return len(np.unique(pairs)) == len(np.unique(labels))


def run_raw_kmeans(cfg: FussConfig, out_dir: str | Path, crf: bool = False, max_vectors: int = 200_000,
                   progress: bool = True) -> dict:
    """Fit k-means (|C| clusters) on the training sites' raw patch features and evaluate like a trained model."""
    out_dir = Path(out_dir)
    run = Run(cfg, pooled_partition(resolve_partition(cfg)))
    run.check_data()
    site = run.train_sites[0]
    site.cache.ensure(run.dataset, site.train_ids, ["train"], device=site.device, progress=progress, desc=site.name)
    feats = site.cache.load_train(site.cache.usable("train", site.train_ids), cfg.train.knn)
    dim, h, w = feats.geometry
    total = feats.num_views * h * w  # every token of every view, in (view, y, x) order
    rng = np.random.default_rng(stable_seed(cfg.federation.seed, "raw-kmeans"))
    pick = torch.from_numpy(rng.choice(total, max_vectors, replace=False)) if total > max_vectors else None
    vectors = torch.empty(total if pick is None else len(pick), dim)  # the sampled tokens, in the order drawn
    offset = 0
    for views in feats.chunks(torch.arange(feats.num_views), 256):
        tokens = views.permute(0, 2, 3, 1).reshape(-1, dim)  # the chunk's tokens: rows offset ... offset + len
        if pick is None:
            vectors[offset:offset + len(tokens)] = tokens
        else:
            inside = (pick >= offset) & (pick < offset + len(tokens))
            vectors[inside] = tokens[pick[inside] - offset]
        offset += len(tokens)
    vectors = F.normalize(vectors, dim=1)
    started = time.perf_counter()
    centres = fit_kmeans(vectors.numpy(), run.num_clusters, 3, cfg.federation.seed, progress)
    model = RawKMeans(torch.from_numpy(centres).float())
    atomic_torch_save(model.centroids, out_dir / KMEANS_FILE)  # normalised centres: RawKMeans(torch.load(...))
    final = {s.name: s.evaluate(model, crf=crf, overlay_dir=out_dir / "overlays" / s.name, num_overlays=4,
                                progress=progress) for s in run.validation_sites}
    out = {"mode": "raw-kmeans", "final": final, **summary_metrics(final), "num_vectors": len(vectors),
           "seconds": time.perf_counter() - started}
    finish_run(out_dir, cfg, out, run)
    return out


def finish_run(out_dir: Path, cfg: FussConfig, result: dict, run: Run) -> None:
    """Write config.json and metrics.json (with ``skipped_images``: ``{site: {id: reason}}``), and say where."""
    result["skipped_images"] = run.skipped_images()
    for site, skipped in result["skipped_images"].items():
        log.warning("site %s: %d image(s) left out (data.on_bad_image='skip'): %s", site, len(skipped),
                    "; ".join(f"{i}: {reason}" for i, reason in skipped.items()))
    cfg.save(out_dir / "config.json")
    _write_json(out_dir / "metrics.json", result)
    log.info("%s: mIoU %s, pixel accuracy %s -> %s", result["mode"], _fmt(result["miou"]),
             _fmt(result["pixel_acc"]), out_dir)


def _fmt(value: float | None) -> str:
    return "n/a (no validation site)" if value is None else f"{value:.4f}"


def run_evaluate(cfg: FussConfig, state: dict[str, torch.Tensor], out_dir: str | Path, crf: bool = False,
                 overlays: int = 0, model_path: str | Path | None = None) -> dict:
    """``fuss evaluate``: a saved model on the validation sites (and after dense CRF with ``crf``); writes
    config.json, metrics.json and ``overlays`` overlay PNGs per site into ``out_dir``."""
    run = Run(cfg)
    run.dataset.require_labels("fuss evaluate")
    run.check_data(("eval",))  # the validation images and labels, before any extraction
    out = Path(out_dir)
    final = run.validate(state, crf=crf, overlay_dir=out / "overlays", num_overlays=overlays, progress=True)
    result = {"mode": "evaluate", "model": str(model_path), "final": final, **summary_metrics(final)}
    if crf:
        result["crf"] = image_weighted_mean({name: m["crf"] | {"num_images": m["num_images"]}
                                             for name, m in final.items()})
    finish_run(out, cfg, result, run)
    return result


RUNNERS = {"federated": run_federated, "local": run_local, "centralized": run_centralized,
           "raw-kmeans": run_raw_kmeans}
