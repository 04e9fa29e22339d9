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
per image of each width).

    python -m benchmarks.channels --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.dev_federation import REPO, RESULTS, dev_partition
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
result = run_federated(FussConfig.load(cfg_file), out, progress=False)
print(json.dumps({"rounds": [r["miou"] for r in result["rounds"]], "final": result["miou"],
                  "seconds": result["seconds"]}))
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--work", default="runs/channels")
    parser.add_argument("--out", default=str(RESULTS / "channels.json"))
    return parser


def bytes_per_image(channels: int, grid: int = 16, views: int = 5) -> int:
    """float16 bytes of one image's cached training views (ViT-S/14 at 224 px: a 16 x 16 grid)."""
    return views * channels * grid * grid * 2


def main(args: argparse.Namespace) -> dict:
    work = Path(args.work).resolve()  # the worker runs in a temporary folder
    work.mkdir(parents=True, exist_ok=True)
    partition = dev_partition(work / "dev_partition.json")
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    report["train_bytes_per_image"] = {"full": bytes_per_image(384),
                                       **{name: bytes_per_image(k) for name, k in WIDTHS.items() if k}}
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
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", WORKER, str(cfg_file), str(work / key),
                                   str(WIDTHS[variant] or 0)], capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=tempfile.gettempdir())
            if proc.returncode != 0:
                raise RuntimeError(f"{key} failed:\n{proc.stderr[-3000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["wall_seconds"] = time.perf_counter() - started
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
