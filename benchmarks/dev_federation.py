"""Training variants compared as a federation on camvid's development split, by seed (the test sequence is never
read).

The main job's federation (sites 0001TP, 0006R0, 0016E5; 11 clusters; FedCC-kmeans; 10 rounds of one local epoch)
trained on the ``fed_split == "train"`` frames of each sequence, and validated every round on their
``fed_split == "test"`` frames (the last 20 % of each sequence: the quality benchmark's dev split) as one
validation site ``dev``. In-process (``fuss_components.runner.run_federated``: the same site, trainer and
aggregation code as the FLARE jobs). Variants:

* ``before``: the trainer of an earlier commit (``--before``), run from a git worktree in a subprocess;
* ``float32`` / ``bfloat16``: this trainer, ``train.precision`` set;
* ``no-release``: this trainer in float32 without the site's centroid release (an experiment only: every site
  then sends its trained centroids as they are), to isolate that rule's effect.

Results: ``docs/results/dev_federation.json`` (per variant and seed: the dev mIoU of every round and the final).

    python -m benchmarks.dev_federation --seeds 0 1 2
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

from fuss_components.config import FussConfig
from fuss_components.files import atomic_write_json
from fuss_components.partition import Partition

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
SITES = ("0001TP", "0006R0", "0016E5")
VARIANTS = ("before", "float32", "bfloat16", "no-release")

# the end of every worker: one federation, its dev mIoU per round as the last line of stdout
RUN_AND_REPORT = r"""
result = run_federated(FussConfig.load(cfg_file), out, progress=False)
print(json.dumps({"rounds": [r["miou"] for r in result["rounds"]], "final": result["miou"],
                  "seconds": result["seconds"]}))
"""


def run_worker(worker: str, args: list[str], pythonpath: Path, key: str) -> dict:
    """Run ``worker`` (Python source) in a fresh interpreter with ``pythonpath`` first; its last line's JSON."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", worker, *args], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"{key} failed:\n{proc.stderr[-3000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    run["wall_seconds"] = time.perf_counter() - started
    return run


WORKER = r"""
import json, sys
from fuss_components.config import FussConfig
from fuss_components.runner import run_federated
cfg_file, out, no_release = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if no_release:
    from fuss_components.disclosure import Release
    from fuss_components.trainer import LocalTrainer
    LocalTrainer.release_centroids = lambda self, model, received, seed: Release([], [], [])
""" + RUN_AND_REPORT


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--before", default="30238ba", help="commit of the 'before' trainer")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--work", default="runs/dev_federation")
    parser.add_argument("--out", default=str(RESULTS / "dev_federation.json"))
    return parser


def dev_partition(path: Path) -> Path:
    """The three training sequences' train frames as sites, their test frames as the validation site ``dev``."""
    from fuss_components.site import open_site_dataset

    ds = open_site_dataset(FussConfig())
    meta = {m["id"]: m["fed_split"] for m in json.loads((Path(ds.root) / "meta.json").read_text())["items"]}
    clients = {s: sorted(i for i in ds.ids(site=s) if meta[i] == "train") for s in SITES}
    dev = sorted(i for s in SITES for i in ds.ids(site=s) if meta[i] == "test")
    Partition("camvid", "site", 0, ds.num_classes, clients, {"dev": dev}, {"note": "development split"}).save(path)
    return path


def main(args: argparse.Namespace) -> dict:
    work = Path(args.work).resolve()  # the worker runs in a temporary folder
    work.mkdir(parents=True, exist_ok=True)
    partition = dev_partition(work / "dev_partition.json")
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    tree = None
    try:
        for variant in args.variants:
            for seed in args.seeds:
                key = f"{variant}/seed{seed}"
                if key in report["runs"]:
                    continue  # resumes where it stopped
                overrides = {"partition": str(partition), "train.seed": seed, "federation.seed": seed,
                             "federation.rounds": args.rounds}
                if variant == "bfloat16":
                    overrides["train.precision"] = "bfloat16"
                cfg = FussConfig().with_overrides(overrides)
                cfg_file = work / f"{variant}_seed{seed}.json"
                data = cfg.to_dict()
                if variant == "before":  # the earlier FussConfig has none of the newer keys
                    for name in ("precision", "feature_storage", "memory_budget_gb"):
                        data["train"].pop(name)
                    if tree is None:
                        tree = Path(tempfile.mkdtemp(prefix="fuss_before_"))
                        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree),
                                        args.before], check=True, capture_output=True)
                cfg_file.write_text(json.dumps(data))
                run = run_worker(WORKER, [str(cfg_file), str(work / key), "1" if variant == "no-release" else "0"],
                                 tree if variant == "before" else REPO, key)
                report["runs"][key] = run
                print(f"{key}: final dev mIoU {100 * run['final']:.2f} ({run['wall_seconds']:.0f} s)", flush=True)
                report["summary"] = summary(report["runs"])
                atomic_write_json(out, report)
    finally:
        if tree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    return report


def summary(runs: dict) -> dict:
    """Per variant: mean and sample std of the final dev mIoU and of the mean over rounds, over seeds."""
    out = {}
    for variant in VARIANTS:
        finals = [r["final"] for k, r in runs.items() if k.startswith(variant + "/")]
        means = [statistics.mean(r["rounds"]) for k, r in runs.items() if k.startswith(variant + "/")]
        if finals:
            out[variant] = {"seeds": len(finals), "final_mean": statistics.mean(finals),
                            "final_std": statistics.stdev(finals) if len(finals) > 1 else None,
                            "round_mean": statistics.mean(means)}
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
