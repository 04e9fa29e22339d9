"""Fewer cached channels: the quality cost of storing a random projection of the backbone features, measured as a
federation on camvid's development split (the test sequence is never read).

The question (scale issue, disk): a ViT-B/8 site of 100k images needs about 600 GB of cached training views; a
cache of k < D' channels takes k / D' of that and the head's first layer does k / D' of its work. A per-site PCA
cannot serve a federation: each site's basis differs, so the averaged head's input weights would mean different
things at different sites, and a shared PCA would need every site's feature covariance at the server. What a
federation can share is a random projection seeded by the job (the same matrix everywhere, nothing learnt from
data), so that is what is measured here.

Each variant trains the development federation of ``benchmarks.dev_federation`` (same sites, partition, rounds,
defaults) with every cached array multiplied by the same seeded ``(D', k)`` matrix with orthonormal columns as it
is read (training views and evaluation views; the kNN lists recomputed on the projected features). Storing the
projection at extraction would give the same numbers up to one float16 rounding of the unprojected features.
``full`` is the unprojected baseline of the same run.

Results: ``docs/results/channels.json`` (per variant and seed: dev mIoU of every round and the final; the bytes
per image of each width; with ``--steps`` the seconds of a training step at each width, for ViT-S/14's and
ViT-B/8's shapes).

    python -m benchmarks.channels --seeds 0 1 2 --steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.dev_federation import REPO, RESULTS, RUN_AND_REPORT, dev_partition, run_worker
from fuss_components.config import FussConfig
from fuss_components.files import atomic_write_json

WIDTHS = {"full": None, "k192": 192, "k144": 144}

WORKER = r"""
import json, sys
import numpy as np
import torch
from fuss_components import backbones, cache as cache_mod, site as site_mod
from fuss_components.config import FussConfig
from fuss_components.runner import run_federated
cfg_file, out, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
if width:
    full = site_mod.feature_dim(FussConfig.load(cfg_file).backbone)
    gen = torch.Generator().manual_seed(20261207)
    basis, _ = torch.linalg.qr(torch.randn(full, width, generator=gen, dtype=torch.float64))
    basis = basis.float().numpy()
    read = cache_mod.FeatureCache._load_with_offset
    def projected(self, kind, image_id):
        array, offset = read(self, kind, image_id)
        axis = 1 if kind == "train" else 0  # (5, D', h, w) or (D', h, w)
        moved = np.moveaxis(array.astype(np.float32), axis, -1) @ basis
        return np.ascontiguousarray(np.moveaxis(moved, -1, axis)).astype(np.float16), offset
    cache_mod.FeatureCache._load_with_offset = projected
    knn_path = cache_mod.FeatureCache.knn_path
    cache_mod.FeatureCache.knn_path = lambda self, ids, k: knn_path(self, ids, k).with_suffix(f".k{width}.npy")
    site_mod.feature_dim = backbones.feature_dim = lambda cfg: width  # the cache's own shape checks keep D'
""" + RUN_AND_REPORT


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--work", default="runs/channels")
    parser.add_argument("--out", default=str(RESULTS / "channels.json"))
    parser.add_argument("--steps", action="store_true", help="also time a training step at every width (synthetic "
                                                             "features of ViT-S/14's and ViT-B/8's shapes)")
    return parser


def bytes_per_image(channels: int, grid: int = 16, views: int = 5) -> int:
    """float16 bytes of one image's cached training views (ViT-S/14 at 224 px: a 16 x 16 grid)."""
    return views * channels * grid * grid * 2


# backbone: (D', tokens a side at 224 px, widths timed; None = all D')
STEP_SHAPES = {"vit_small_patch14_dinov2": (384, 16, (None, 192, 144)),
               "vit_base_patch8_224": (768, 28, (None, 384, 288))}


def step_seconds(name: str, side: int, width: int | None, images: int = 60, steps: tuple[int, int] = (5, 25),
                 repeats: int = 3) -> float:
    """Seconds of one training step (default config, ``train.precision`` auto) on synthetic cached features of
    ``width`` channels (None: the backbone's own), as ``benchmarks.speed`` times it: the difference of two round
    lengths, median of ``repeats``."""
    import torch

    from fuss_components.backbones import feature_dim
    from fuss_components.site import init_global_state
    from fuss_components.trainer import LocalTrainer
    from fuss_components.views import MemoryViews, TrainFeatures

    cfg = FussConfig.from_dict({"backbone": {"name": name, "project_dim": width}, "federation": {"rounds": 1},
                                "train": {"num_clusters": 27}})
    torch.manual_seed(0)
    views = images * 5
    pool = MemoryViews.empty(views, feature_dim(cfg.backbone), side, side)
    pool.tokens.copy_(torch.randn(pool.tokens.shape).half())
    trainer = LocalTrainer(TrainFeatures(pool, [f"i{v // 5}" for v in range(views)], torch.randint(views, (views, 7))),
                           cfg, "bench", 27)
    state = init_global_state(cfg, 27)

    def length(count: int) -> float:
        started = time.perf_counter()
        trainer.train(state, 0, steps=count)
        return time.perf_counter() - started

    length(3)
    return statistics.median((length(steps[1]) - length(steps[0])) / (steps[1] - steps[0]) for _ in range(repeats))


def measure_steps() -> dict:
    """Step seconds and cache bytes an image for every width of :data:`STEP_SHAPES`, in one run."""
    out = {}
    for name, (full, side, widths) in STEP_SHAPES.items():
        for width in widths:
            channels = width or full
            out[f"{name}/{channels}"] = {"channels": channels, "step_seconds": step_seconds(name, side, width),
                                         "train_bytes_per_image": bytes_per_image(channels, side)}
            print(f"{name} {channels} channels: {1000 * out[f'{name}/{channels}']['step_seconds']:.1f} ms a step",
                  flush=True)
    return out


def main(args: argparse.Namespace) -> dict:
    work = Path(args.work).resolve()  # the worker runs in a temporary folder
    work.mkdir(parents=True, exist_ok=True)
    partition = dev_partition(work / "dev_partition.json")
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    report["train_bytes_per_image"] = {"full": bytes_per_image(384),
                                       **{name: bytes_per_image(k) for name, k in WIDTHS.items() if k}}
    if args.steps:
        report["steps"] = measure_steps()
        atomic_write_json(out, report)
    for variant in args.variants:
        for seed in args.seeds:
            key = f"{variant}/seed{seed}"
            if key in report["runs"]:
                continue  # resumes where it stopped
            cfg = FussConfig().with_overrides({"partition": str(partition), "train.seed": seed,
                                               "federation.seed": seed, "federation.rounds": args.rounds,
                                               "train.feature_storage": "memory"})
            cfg_file = work / f"{variant}_seed{seed}.json"
            cfg_file.write_text(json.dumps(cfg.to_dict()))
            run = run_worker(WORKER, [str(cfg_file), str(work / key), str(WIDTHS[variant] or 0)], REPO, key)
            report["runs"][key] = run
            print(f"{key}: final dev mIoU {100 * run['final']:.2f} ({run['wall_seconds']:.0f} s)", flush=True)
            report["summary"] = summary(report["runs"])
            atomic_write_json(out, report)
    return report


def summary(runs: dict) -> dict:
    """Per variant: mean and sample std of the final dev mIoU and of the mean over rounds, and the paired
    difference to ``full`` (same seed)."""
    out = {}
    for variant in WIDTHS:
        seeds = {k.split("/")[1]: r for k, r in runs.items() if k.startswith(variant + "/")}
        if not seeds:
            continue
        finals = [r["final"] for r in seeds.values()]
        row = {"seeds": len(finals), "final_mean": statistics.mean(finals),
               "final_std": statistics.stdev(finals) if len(finals) > 1 else None,
               "round_mean": statistics.mean(statistics.mean(r["rounds"]) for r in seeds.values())}
        paired = [r["final"] - runs[f"full/{s}"]["final"] for s, r in seeds.items() if f"full/{s}" in runs]
        if variant != "full" and paired:
            row["paired_vs_full_mean"] = statistics.mean(paired)
            row["paired_vs_full_std"] = statistics.stdev(paired) if len(paired) > 1 else None
        out[variant] = row
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
