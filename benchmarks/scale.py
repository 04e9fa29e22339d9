"""Sites of any size: memory, load, kNN and training time against the number of images, in memory and streamed.

Synthetic cache files with the real shapes (float16 five-crop views of ViT-S/14, 384 x 16 x 16, about 1 MB an
image, and of the paper's ViT-B/8, 768 x 28 x 28, about 6 MB an image; written once, with their sidecars, as
``FeatureCache`` writes them) stand in for sites we do not have. Each measurement runs in a fresh subprocess
(``measure``): the RSS after the imports, then ``FeatureCache.load_train`` (every file read and checksummed once,
the kNN computed from the descriptors), then two rounds of different lengths of the real ``LocalTrainer`` (their
difference gives seconds a step; a round of N steps costs the fixed part plus N steps), and the peak RSS. Streaming
is forced with a budget below the pool. The files are deleted afterwards (``--keep`` keeps them). Results:
``docs/results/scale.json``, figure ``docs/figures/scale.png``.

    python -m benchmarks.scale --images 1000 5000 20000 --work /scratch/fuss_scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
FIGURES = REPO / "docs" / "figures"
BACKBONES = {"vit_small_patch14_dinov2": (384, 16), "vit_base_patch8_224": (768, 28)}
NAMES = {384: "vit_small_patch14_dinov2", 768: "vit_base_patch8_224"}
DATASET = "synthetic"

WORKER = r"""
import json, sys, time
import torch
from fuss_components import views
from fuss_components.cache import FeatureCache
from fuss_components.config import FussConfig
from fuss_components.site import init_global_state
from fuss_components.trainer import LocalTrainer
from fuss_components.views import choose_storage, memory_budget, pool_bytes

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
cfg = FussConfig.from_dict(json.loads(sys.argv[1]))
images, short, long = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = [f"img{i:06d}" for i in range(images)]
timing = {}
real = views.knn_from_descriptors
def timed(*args, **kwargs):
    started = time.perf_counter()
    out = real(*args, **kwargs)
    timing["knn_seconds"] = time.perf_counter() - started
    return out
import fuss_components.cache as cache_module
cache_module.knn_from_descriptors = timed
cache = FeatureCache(cfg, "synthetic")
_, dim, h, w = cache.expected_shape("train")
tc = cfg.train
storage = choose_storage(tc.feature_storage, images * 5, dim, h, w, tc.batch_size, tc.num_random,
                         memory_budget(tc.memory_budget_gb))
# warm-up on a few images in the same storage, so that the baseline holds the code, thread pools and allocator
# arenas that loading and training touch
warm = LocalTrainer(cache.load_train(ids[:8], tc.knn, storage), cfg, "warm-up", 27)
for _ in range(2):
    warm.train(init_global_state(cfg, 27), 0, steps=4)
del warm
import threading
baseline = rss()
peak = {"bytes": baseline}
def sample():
    while True:
        peak["bytes"] = max(peak["bytes"], rss())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
started = time.perf_counter()
feats = cache.load_train(ids, tc.knn, storage)
load = time.perf_counter() - started
after_load = max(peak["bytes"], rss())
trainer = LocalTrainer(feats, cfg, "synthetic", 27)
state = init_global_state(cfg, 27)
def round_seconds(steps):
    started = time.perf_counter()
    trainer.train(state, 0, steps=steps)
    return time.perf_counter() - started
round_seconds(2)
a, b = round_seconds(short), round_seconds(long)
print(json.dumps({"storage": storage, "pool_bytes": pool_bytes(images * 5, dim, h, w), "baseline_rss_bytes": baseline,
                  "peak_rss_after_load_bytes": after_load,
                  "peak_rss_bytes": max(peak["bytes"], rss()),
                  "load_seconds": load, "knn_seconds": timing.get("knn_seconds"), "step_seconds": (b - a) / (long - short),
                  "round_seconds": {str(short): a, str(long): b}}))
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--modes", nargs="+", default=["memory", "stream"], choices=["memory", "stream"])
    parser.add_argument("--steps", type=int, nargs=2, default=[10, 30], metavar=("SHORT", "LONG"))
    parser.add_argument("--work", default=None, help="folder for the synthetic cache (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic cache files")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    parser.add_argument("--figure", default=str(FIGURES / "scale.png"))
    return parser


def config(cache_root: Path, dim: int, storage: str, budget_gb: float | None) -> dict:
    return {"backbone": {"name": NAMES[dim], "weights": "random"}, "data": {"dataset": DATASET},
            "train": {"num_clusters": 27, "feature_storage": storage, "memory_budget_gb": budget_gb},
            "federation": {"rounds": 1}, "partition": "site", "cache_dir": str(cache_root)}


def write_synthetic(cache_root: Path, dim: int, side: int, images: int) -> float:
    """Cache files of ``images`` synthetic images (as FeatureCache writes them); returns the seconds it took."""
    import numpy as np

    from fuss_components.cache import FeatureCache
    from fuss_components.config import FussConfig

    cache = FeatureCache(FussConfig.from_dict(config(cache_root, dim, "memory", None)), DATASET)
    cache.dir("train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    block = rng.standard_normal((5, dim, side, side), dtype=np.float32).astype(np.float16)
    for i in range(images):
        path = cache.path("train", f"img{i:06d}")
        if not path.is_file():
            block[i % 5, i % dim] += 1  # every image's views differ
            cache._save(path, block)
    return time.perf_counter() - started


def measure(cache_root: Path, dim: int, side: int, images: int, storage: str, steps=(10, 30),
            budget_gb: float | None = None) -> dict:
    """One subprocess measurement (module docstring); writes the synthetic files first when absent."""
    write_synthetic(cache_root, dim, side, images)
    # one malloc arena: glibc's per-thread arenas (the prefetch thread's, torch's) otherwise add up to 100 MB of
    # run-to-run noise to the RSS this measures
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_ARENA_MAX="1")
    env.pop("FUSS_SITE_POLICY", None)
    cfg = config(cache_root, dim, storage, budget_gb)
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(cfg), str(images), str(steps[0]),
                           str(steps[1])], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"scale worker failed ({dim} channels, {images} images, {storage}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> dict:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fuss_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"disk": str(work), "disk_free_gb_at_start": shutil.disk_usage(work).free / 1e9,
              "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, "runs": []}
    out = Path(args.out)
    try:
        for name in args.backbones:
            dim, side = BACKBONES[name]
            image_bytes = 5 * dim * side * side * 2
            for images in args.images:
                root = work / f"{dim}"
                if image_bytes * images > 0.9 * shutil.disk_usage(work).free + _size(root):
                    report["runs"].append({"backbone": name, "images": images, "skipped": "disk too small"})
                    continue
                written = write_synthetic(root, dim, side, images)
                for mode in args.modes:
                    pool = image_bytes * images
                    budget = pool / 3 / 2**30 if mode == "stream" else None
                    if mode == "memory" and 1.2 * pool > 0.8 * report["ram_gb"] * 2**30:
                        report["runs"].append({"backbone": name, "images": images, "mode": mode,
                                               "skipped": f"the pool ({pool / 2**30:.1f} GiB) does not fit in RAM"})
                        continue
                    _drop_knn(root)  # every measurement computes its kNN, as a first start does
                    result = measure(root, dim, side, images, mode, tuple(args.steps), budget)
                    result.update(backbone=name, images=images, mode=mode, write_seconds=written,
                                  budget_gb=budget)
                    report["runs"].append(result)
                    print(f"{name} {images} images {mode}: peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB "
                          f"(pool {pool / 2**30:.2f}), load {result['load_seconds']:.1f} s, kNN "
                          f"{result['knn_seconds']:.1f} s, {1000 * result['step_seconds']:.0f} ms a step",
                          flush=True)
                    from fuss_components.files import atomic_write_json
                    atomic_write_json(out, report)
                if not args.keep:
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    figure(report, Path(args.figure))
    return report


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _drop_knn(root: Path) -> None:
    for path in root.rglob("knn-*"):
        path.unlink()


def figure(report: dict, path: Path) -> None:
    """Log-log: peak RSS and seconds (load, kNN, a step) against images, per backbone and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if "peak_rss_bytes" in r]
    if not runs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, mode) in sorted({(r["backbone"], r["mode"]) for r in runs}):
        rows = sorted((r for r in runs if r["backbone"] == name and r["mode"] == mode), key=lambda r: r["images"])
        x = [r["images"] for r in rows]
        label = f"{'ViT-S/14' if '384' in str(BACKBONES[name]) or 'small' in name else 'ViT-B/8'} {mode}"
        axes[0].plot(x, [r["peak_rss_bytes"] / 2**30 for r in rows], "o-", label=label)
        axes[1].plot(x, [r["load_seconds"] for r in rows], "o-", label=f"{label}: load")
        axes[1].plot(x, [r["knn_seconds"] for r in rows], "s--", label=f"{label}: kNN")
        axes[1].plot(x, [r["step_seconds"] * 100 for r in rows], "^:", label=f"{label}: 100 steps")
    for ax, title in zip(axes, ("peak RSS (GiB)", "seconds")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("images of the site")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
