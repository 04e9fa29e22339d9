"""Quality experiments on cached features, every choice made on a development split (never on the test set).

Splits (no test label is read unless ``--split test``):

* camvid: train = the ``fed_split == "train"`` frames of the training sequences 0001TP / 0006R0 / 0016E5,
  dev = their ``fed_split == "test"`` frames (the last 20 % of each sequence), test = Seq05VD (held out).
* polyp: train = each hospital's ``split == "train"`` items minus a seeded 15 % (= dev); test = the PraNet
  test lists (``split == "test"``).

A variant is a set of ``--set`` config overrides. One training run (centralized: all training images pooled, the
same ``LocalTrainer`` as every FLARE site) is scored with the learned centroids and with k-means of the head's
codes, and with an over-clustered k-means (2 x |C| clusters, many-to-one matching) as an extra column that is
never the headline. Raw-feature k-means is the floor (``--raw``). Results go to
``docs/results/quality_<dataset>.json`` (one entry per variant and split, with the config and timings).

    python -m benchmarks.quality --dataset camvid --variant base
    python -m benchmarks.quality --dataset camvid --variant eval448 --set data.eval_short_side=448
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from fuss_components.cache import FeatureCache
from fuss_components.config import FussConfig, parse_overrides
from fuss_components.files import atomic_write_json
from fuss_components.head import FussModel
from fuss_components.metrics import ConfusionMatrix
from fuss_components.objectives import spherical_kmeans
from fuss_components.site import init_global_state, num_clusters, open_site_dataset
from fuss_components import trainer as trainer_module
from fuss_components.backbones import load_backbone
from fuss_components.paths import cache_dir
from fuss_components.trainer import LocalTrainer
from fuss_components.transforms import eval_view

log = logging.getLogger("quality")
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
TRAIN_SITES = {"camvid": ["0001TP", "0006R0", "0016E5"], "polyp": ["kvasir", "cvc_clinicdb"]}
DEV_FRACTION = 0.15


def splits(cfg: FussConfig, ds) -> dict[str, list[str]]:
    name = cfg.data.dataset
    if name == "camvid":
        items = {s.id: s for s in ds.samples()}
        meta = json.loads((Path(ds.root) / "meta.json").read_text())["items"]
        fed = {m["id"]: m["fed_split"] for m in meta}
        train = [i for i in items if items[i].site in TRAIN_SITES[name] and fed[i] == "train"]
        dev = [i for i in items if items[i].site in TRAIN_SITES[name] and fed[i] == "test"]
        test = [i for i in items if items[i].site == "Seq05VD"]
        return {"train": sorted(train), "dev": sorted(dev), "test": sorted(test)}
    if name == "polyp":
        train, dev = [], []
        for site in TRAIN_SITES[name]:
            ids = sorted(ds.ids(split="train", site=site))
            random.Random(f"dev-{site}").shuffle(ids)
            cut = round(DEV_FRACTION * len(ids))
            dev += ids[:cut]
            train += ids[cut:]
        return {"train": sorted(train), "dev": sorted(dev), "test": sorted(ds.ids(split="test"))}
    raise SystemExit(f"no development split defined for dataset {name!r}")


@torch.no_grad()
def sample_codes(model, feats, count: int, seed: int) -> torch.Tensor:
    """``count`` random L2-normalised code vectors of the training views (``TrainFeatures``; head in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    views = torch.randperm(feats.num_views, generator=gen)[:min(feats.num_views, 2000)]
    out = []
    per_view = max(1, count // len(views))
    for chunk in views.split(64):
        code = model(feats.views(chunk))
        code = code.permute(0, 2, 3, 1).reshape(len(chunk), -1, code.shape[1])
        pick = torch.randint(code.shape[1], (len(chunk), per_view), generator=gen)
        out.append(code.gather(1, pick[..., None].expand(-1, -1, code.shape[2])).reshape(-1, code.shape[2]))
    return F.normalize(torch.cat(out), dim=1)


def merge_groups(centroids: torch.Tensor, k: int) -> torch.Tensor:
    """Label-free merge of over-clustered centroids into ``k`` groups: average-linkage agglomerative clustering
    on the centroids' cosine distance. Returns each centroid's group id."""
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(centroids.numpy())
    return torch.from_numpy(labels).long()


def kmeans_centroids(vectors: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    km = KMeans(k, n_init=10, random_state=seed).fit(vectors.numpy())
    return F.normalize(torch.from_numpy(km.cluster_centers_).float(), dim=1)


class Scorer:
    """Accumulates confusion matrices of several (name, centroids) predictors over the same images."""

    def __init__(self, predictors: dict[str, torch.Tensor], num_classes: int, upsample: str,
                 groups: dict[str, torch.Tensor] | None = None):
        self.predictors = predictors
        self.upsample = upsample
        self.groups = groups or {}  # predictor -> cluster -> merged cluster id (label-free merges)
        self.cms = {n: ConfusionMatrix(int(self.groups[n].max()) + 1 if n in self.groups else len(c), num_classes)
                    for n, c in predictors.items()}

    @torch.no_grad()
    def add(self, code: torch.Tensor, label: np.ndarray) -> None:
        size = label.shape
        if self.upsample == "codes":  # STEGO: upsample the codes, then the cosine to the centroids
            code = F.interpolate(code[None], size=size, mode="bilinear", align_corners=False)[0]
        code = F.normalize(code, dim=0)
        for name, cent in self.predictors.items():
            logits = torch.einsum("dhw,cd->chw", code, cent)
            if self.upsample == "logits":
                logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
            assignment = logits.argmax(0)
            if name in self.groups:
                assignment = self.groups[name][assignment]
            self.cms[name].update(assignment.numpy(), label)

    def results(self) -> dict:
        out = {}
        for name, cm in self.cms.items():
            r = cm.compute()
            if cm.num_clusters > cm.num_classes:  # over-clustered: many-to-one (each cluster -> majority class)
                merged = ConfusionMatrix(cm.num_classes, cm.num_classes)
                for k, c in enumerate(cm.counts.argmax(axis=1)):
                    merged.counts[c] += cm.counts[k]
                r = merged.compute()
                r["assignment"] = [int(c) for c in cm.counts.argmax(axis=1)]
            out[name] = {k: r[k] for k in ("miou", "pixel_acc", "per_class_iou", "clusters_used")}
        return out


# Experiment-only levers (not config keys until one earns a place): each maps a value to a stego step subclass.
class _CentroidShapesHead(trainer_module._StegoStep):
    """The centroid loss (hard assignment, Eq. 5) also pulls the head's codes towards their nearest centroid
    (weight ``weight``); the stock loss detaches the codes, so the centroids never shape the head."""

    weight = 0.0

    def head_loss(self, model, q, feats_q, code_q, gen):
        loss, terms = super().head_loss(model, q, feats_q, code_q, gen)
        inner = torch.einsum("bdhw,cd->bchw", F.normalize(code_q, dim=1), F.normalize(model.centroids.detach(), dim=1))
        terms["loss_centroid_head"] = -inner.max(dim=1).values.mean()
        return loss + self.weight * terms["loss_centroid_head"], terms


class _CorrelationDropout(trainer_module._StegoStep):
    """STEGO computes the feature correlations from Dropout2d'ed features (and the codes from them too)."""

    p = 0.0

    def head_loss(self, model, q, feats_q, code_q, gen):
        trainer = self.trainer
        plain = trainer._batch
        trainer._batch = lambda index: F.dropout2d(plain(index), self.p, training=True)
        try:
            return super().head_loss(model, q, F.dropout2d(feats_q, self.p, training=True), code_q, gen)
        finally:
            trainer._batch = plain


LEVERS = {"centroid-head": (_CentroidShapesHead, "weight"), "corr-dropout": (_CorrelationDropout, "p")}


def apply_lever(spec: str | None) -> None:
    if not spec:
        return
    name, value = spec.split(":")
    cls, attr = LEVERS[name]
    setattr(cls, attr, float(value))
    trainer_module.OBJECTIVE_STEPS["stego"] = cls


TTA_MODES = ("none", "flip", "shift", "shift+flip")


@torch.no_grad()
def tta_features(cfg: FussConfig, ds, ids: list[str], mode: str) -> dict[str, list[torch.Tensor]]:
    """Per image, the feature maps whose codes are averaged: ``flip`` adds the mirrored image's features (mirrored
    back); ``shift`` replaces the token grid by a grid of twice the density, interleaving the grids of the image
    shifted by half a patch (0 / p/2 in y and x, replicate-padded). Cached in the feature cache folder."""
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]  # one file per image list (split)
    path = (cache_dir(cfg.cache_dir)
            / f"quality_tta_{ds.name}_b{cfg.backbone.block}_{cfg.data.eval_short_side}_{mode}_{digest}.pt")
    if path.exists():
        return torch.load(path)
    backbone = load_backbone(cfg.backbone, torch.device("cpu"))
    p, half = backbone.patch_size, backbone.patch_size // 2
    flips = [False, True] if "flip" in mode else [False]
    offsets = [(0, 0), (0, half), (half, 0), (half, half)] if "shift" in mode else [(0, 0)]
    out = {}
    for image_id in ids:
        view = eval_view(ds.load_image(image_id), cfg.data.eval_short_side, p)
        maps = []
        for flip in flips:
            x = view.flip(-1) if flip else view
            grids = {}
            for dy, dx in offsets:
                shifted = F.pad(x[None, :, dy:, dx:], (0, dx, 0, dy), mode="replicate")
                grids[(dy, dx)] = backbone.features(shifted)[0]
            if len(offsets) == 1:
                f = grids[(0, 0)]
            else:
                d, h, w = grids[(0, 0)].shape
                f = torch.empty(d, 2 * h, 2 * w)
                for (dy, dx), g in grids.items():
                    f[:, dy // half::2, dx // half::2] = g
            maps.append((f.flip(-1) if flip else f).half())
        out[image_id] = maps
    torch.save(out, path)
    return out


def run(args) -> dict:
    cfg = FussConfig().with_overrides({"data.dataset": args.dataset, "partition": "site", **parse_overrides(args.set)})
    torch.manual_seed(0)
    apply_lever(args.lever)
    ds = open_site_dataset(cfg)
    split = splits(cfg, ds)
    k = num_clusters(cfg, ds)
    cache = FeatureCache(cfg, ds.name)
    t0 = time.perf_counter()
    cache.ensure(ds, split["train"], ["train"], progress=True, desc="train")
    cache.ensure(ds, split[args.split], ["eval"], progress=True, desc=args.split)
    extract_s = time.perf_counter() - t0
    feats = cache.load_train(split["train"], cfg.train.knn)
    seed = cfg.train.seed
    t0 = time.perf_counter()
    if args.raw:
        model = torch.nn.Identity()
        train_metrics = {}
    else:
        trainer = LocalTrainer(feats, cfg, "centralized", k)
        state = init_global_state(cfg, k)
        steps = round(args.epochs * feats.num_views / cfg.train.batch_size)
        result = trainer.train(state, 0, steps=steps)
        train_metrics = result.metrics
        fm = FussModel(feats.geometry[0], cfg.train.dim, k, cfg.train.dropout)
        fm.load_state_dict(result.state)
        fm.eval()
        model = fm.head
    train_s = time.perf_counter() - t0
    codes = sample_codes(model, feats, 100_000, seed)
    predictors = {"kmeans": kmeans_centroids(codes, k, seed), "over2x": kmeans_centroids(codes, 2 * k, seed)}
    if not args.raw:
        predictors["learned"] = F.normalize(fm.centroids.detach(), dim=1)
        predictors["refit"] = spherical_kmeans(codes, fm.centroids.detach(), 30)
    entries = []
    for tta in args.tta:
        predictors["over2x-merged"] = predictors["over2x"]
        groups = {"over2x-merged": merge_groups(predictors["over2x"], k)}
        scorer = Scorer(predictors, ds.num_classes, args.upsample, groups)
        t0 = time.perf_counter()
        maps = tta_features(cfg, ds, split[args.split], tta) if tta != "none" else None
        tta_s = time.perf_counter() - t0
        with torch.no_grad():
            for image_id in split[args.split]:
                if maps is None:
                    code = model(cache.load_eval(image_id).float()[None])[0]
                else:
                    # the mean of the unit codes: its cosine to a centroid is the mean of the views' cosines,
                    # i.e. the averaged cluster scores that evaluation computes
                    code = torch.stack([F.normalize(model(f.float()[None])[0], dim=0) for f in maps[image_id]]).mean(0)
                scorer.add(code, ds.load_label(image_id))
        variant = args.variant if tta == "none" else f"{args.variant}, tta {tta}"
        entries.append(record(args, cfg, ds, split, variant, scorer.results(), train_metrics, tta,
                              {"extract_new": extract_s, "train": train_s, "tta_extract": tta_s,
                               "eval": time.perf_counter() - t0}))
    return entries


def record(args, cfg, ds, split, variant, scores, train_metrics, tta, seconds) -> dict:
    entry = {"variant": variant, "split": args.split, "overrides": parse_overrides(args.set),
             "lever": args.lever, "tta": tta, "block": cfg.backbone.block, "epochs": args.epochs,
             "upsample": args.upsample, "num_train_images": len(split["train"]),
             "num_eval_images": len(split[args.split]), "scores": scores, "train": train_metrics,
             "seconds": seconds,
             "classes": ds.classes,
             "when": time.strftime("%Y-%m-%d %H:%M")}
    path = Path(args.out or RESULTS) / f"quality_{args.dataset}.json"
    records = json.loads(path.read_text()) if path.exists() else []
    records = [r for r in records if not (r["variant"] == variant and r["split"] == args.split)]
    records.append(entry)
    atomic_write_json(path, records, indent=1)
    line = "  ".join(f"{n} {100 * s['miou']:.2f}" for n, s in scores.items())
    print(f"{args.dataset} {args.split} {variant}: {line}  (train {seconds['train']:.0f} s)", flush=True)
    for n, s in scores.items():
        print(f"   {n:8s} " + " ".join(f"{100 * v:5.1f}" for v in s["per_class_iou"]))
    return entry


def table(dataset: str, out: str | None = None) -> str:
    """Markdown table of every recorded variant of ``dataset`` (mIoU in points per predictor, per-class IoU of the
    learned centroids, or of k-means for raw features)."""
    records = json.loads((Path(out or RESULTS) / f"quality_{dataset}.json").read_text())
    classes = records[0]["classes"]
    head = ["variant", "split", "block", "overrides", "lever", "tta", "epochs", "learned", "refit", "kmeans",
            "over2x (extra)", "over2x merged (label-free)", "train s"] + classes
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        s = r["scores"]
        main = s.get("learned", s["kmeans"])
        cells = [r["variant"], r["split"], str(r["block"]), ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-",
                 r.get("lever") or "-", r.get("tta") or "none",
                 f"{r['epochs']:g}", *(f"{100 * s[n]['miou']:.2f}" if n in s else "-"
                                       for n in ("learned", "refit", "kmeans", "over2x", "over2x-merged")),
                 f"{r['seconds']['train']:.0f}", *(f"{100 * v:.1f}" for v in main["per_class_iou"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="camvid", choices=sorted(TRAIN_SITES))
    p.add_argument("--variant", help="name under which the run is recorded")
    p.add_argument("--raw", action="store_true", help="no training: k-means on the raw backbone features")
    p.add_argument("--table", action="store_true", help="print the Markdown table of the recorded variants")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--epochs", type=float, default=3.0, help="epochs over the pooled training views")
    p.add_argument("--split", default="dev", choices=["dev", "test"], help="test only for chosen defaults")
    p.add_argument("--upsample", default="logits", choices=["logits", "codes"])
    p.add_argument("--out", help="folder of quality_<dataset>.json (default: docs/results)")
    p.add_argument("--lever", help="experiment-only training change, e.g. centroid-head:0.1 or corr-dropout:0.1")
    p.add_argument("--tta", nargs="+", default=["none"], choices=TTA_MODES,
                   help="test-time feature maps: flip averaging, half-patch shifted grids (each: one record)")
    return p


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    parsed = get_args_parser().parse_args()
    if parsed.table:
        print(table(parsed.dataset, parsed.out))
    elif not parsed.variant:
        raise SystemExit("--variant NAME (or --table) is required")
    else:
        run(parsed)
