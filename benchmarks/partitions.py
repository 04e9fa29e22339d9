"""Class histograms of the label-skewed partition presets: what each client of each federation holds.

For every label-skewed preset of a dataset (the ``fuss_components.presets.PRESETS`` entries of that dataset
other than the by-site one, e.g. ``camvid-dir0.1``) and every client count its jobs offer, the seed's manifest
(seed 0 by default, as the jobs' ``federation.seed``) is summarised per client: its images, its pixels per class
and its images per dominant class (polyp: also per polyp-size quartile, the tag those presets split by). Writes
``docs/results/partitions_<dataset>.json`` and one figure per partition,
``docs/figures/partition_<preset>_<clients>.png``: stacked bars per client, the share of each class among the
client's labelled pixels and its images per tag. Reads the training images' labels only (never the validation
sites'), no image and no feature: seconds.

    python -m benchmarks.partitions --dataset camvid
    python -m benchmarks.partitions --dataset polyp
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from fuss_components.datasets import SegmentationDataset, open_dataset
from fuss_components.files import atomic_write_json
from fuss_components.partition import Partition, dominant_classes, label_class_pixels
from fuss_components.presets import POLYP_SIZE_BINS, PRESETS, preset_partition
from fuss_components.paths import data_root

REPO = Path(__file__).resolve().parent.parent
RESULTS, FIGURES = REPO / "docs" / "results", REPO / "docs" / "figures"
SIZE_BIN_NAMES = [f"polyp-size quartile {b + 1}" for b in range(POLYP_SIZE_BINS)]  # 1 = smallest polyps


def skewed_presets(dataset: str) -> list[str]:
    """The label-skewed presets of a dataset, in table order."""
    return [name for name, p in PRESETS.items() if p.dataset == dataset and name != dataset]


def figure_name(preset: str, clients: int) -> str:
    return f"partition_{preset}_{clients}.png"


def summarize(ds: SegmentationDataset, part: Partition) -> dict:
    """Per client: images, pixels per class, images per dominant class (and per polyp-size bin when the partition
    was made by size), the tags it sees in a split with missing classes; validation images per site."""
    ids = [i for members in part.clients.values() for i in members]
    pixels = label_class_pixels(ds, ids, progress=False)
    dominant = dominant_classes(ds, ids, progress=False)
    seen = part.meta.get("classes_seen") or part.meta.get("size_bins_seen") or {}
    clients = {}
    for name, members in part.clients.items():
        entry = {"images": len(members),
                 "class_pixels": np.sum([pixels[i] for i in members], axis=0).tolist(),
                 "dominant_class_images": np.bincount([dominant[i] for i in members if dominant[i] >= 0],
                                                      minlength=ds.num_classes).tolist()}
        if "size_bin_counts" in part.meta:
            entry["size_bin_images"] = part.meta["size_bin_counts"][name]
        if name in seen:
            entry["tags_seen"] = seen[name]
        clients[name] = entry
    meta = {k: part.meta[k] for k in ("alpha", "attempt", "size_bin_edges") if k in part.meta}
    return {"strategy": part.strategy, "seed": part.seed, "description": PRESETS[part.meta["preset"]].description,
            "meta": meta, "clients": clients, "validation": {s: len(v) for s, v in part.validation.items()}}


def plot(summary: dict, key: str, classes: list[str], path: Path) -> Path:
    """Two stacked-bar panels per client: share of labelled pixels per class; images per tag. ``key``: the
    partition's ``<preset>:<clients>``, for the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = list(summary["clients"])
    by_size = all("size_bin_images" in c for c in summary["clients"].values())
    tag_names, tag_key = (SIZE_BIN_NAMES, "size_bin_images") if by_size else (classes, "dominant_class_images")
    tag = "polyp-size quartiles" if by_size else "dominant classes"
    how = (f"Dirichlet({summary['meta']['alpha']}) over the {tag}" if summary["strategy"] == "dirichlet"
           else f"each client holds only about half of the {tag}")
    held_out = ", ".join(f"{site} ({n} images)" for site, n in summary["validation"].items())
    pixels = np.array([c["class_pixels"] for c in summary["clients"].values()], float)
    shares = pixels / np.maximum(pixels.sum(axis=1, keepdims=True), 1)
    tags = np.array([c[tag_key] for c in summary["clients"].values()], float)
    colours = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    x = np.arange(len(clients))
    slanted = len(clients) > 6 or max(map(len, clients)) > 9  # names that would overlap
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.1 * len(clients) + 5), 4.6))
    for ax, values, names, label in (
            (axes[0], shares, classes, "share of the client's labelled pixels"),
            (axes[1], tags, tag_names, "images" + (" per polyp-size quartile" if by_size
                                                   else " per dominant class"))):
        bottom = np.zeros(len(clients))
        for k, name in enumerate(names):
            if values[:, k].any():
                ax.bar(x, values[:, k], bottom=bottom, color=colours(k % colours.N), label=name, width=0.75)
            bottom += values[:, k]
        ax.set_xticks(x, clients, rotation=45 if slanted else 0, ha="right" if slanted else "center", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for xi, c in zip(x, summary["clients"].values()):
        axes[1].annotate(str(c["images"]), (xi, tags[xi].sum()), ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"{key}, seed {summary['seed']}: {how}; validation {held_out}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_partitions(dataset: str, root: str | None, seed: int, out: Path, figures: Path) -> dict:
    """Build every label-skewed preset of ``dataset`` for every offered client count; write the JSON and figures."""
    ds = open_dataset(dataset, data_root(root))
    presets = skewed_presets(dataset)
    if not presets:
        raise ValueError(f"dataset {dataset!r} has no label-skewed partition preset (known: "
                         f"{sorted({p.dataset for n, p in PRESETS.items() if n != p.dataset})})")
    results = {"dataset": dataset, "seed": seed, "classes": list(ds.classes), "partitions": {}}
    for name in presets:
        for clients in PRESETS[name].client_choices:
            part = preset_partition(name, ds, seed=seed, num_clients=clients)
            summary = summarize(ds, part)
            fig = plot(summary, f"{name}:{clients}", list(ds.classes), figures / figure_name(name, clients))
            summary["figure"] = str(fig.relative_to(REPO)) if fig.is_relative_to(REPO) else str(fig)
            results["partitions"][f"{name}:{clients}"] = summary
    path = out / f"partitions_{dataset}.json"
    atomic_write_json(path, results, indent=1)
    path.write_text(_numbers_on_one_line(path.read_text()))
    return results


def _numbers_on_one_line(text: str) -> str:
    """JSON lists of numbers on one line each (one number per line makes the histograms unreadable)."""
    return re.sub(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.partitions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted({p.dataset for n, p in PRESETS.items()
                                                               if n != p.dataset}))
    p.add_argument("--data-root", help="data root (default: $FUSS_DATA_ROOT, else <shared>/data)")
    p.add_argument("--seed", type=int, default=0, help="federation.seed of the manifests (default 0, the jobs')")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of partitions_<dataset>.json")
    p.add_argument("--figures", type=Path, default=FIGURES, help="folder of the partition_*.png figures")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    results = bench_partitions(args.dataset, args.data_root, args.seed, args.out, args.figures)
    for key, summary in results["partitions"].items():
        sizes = [c["images"] for c in summary["clients"].values()]
        print(f"{key:<20} {summary['strategy']:<9} images per client {sizes} -> {summary['figure']}")
    print(f"wrote {args.out / f'partitions_{args.dataset}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
