"""Seconds of one training step against this machine's own matrix-multiply rate, before and after, in one run.

For the feature shapes of ViT-S/14 (384 channels, 16 x 16 tokens a 224-px view) and the paper's ViT-B/8 (768, 28 x
28), on synthetic float16 features (the step's cost does not depend on their values): the sgemm rate at the head's
shapes in float32 and bfloat16, the FLOPs a step must do (counted from the shapes: the head forward and backward
on the query maps and on the partner tokens the sampled points read, and the correlations), the seconds a step
takes (the difference of two round lengths, so a round's fixed work is left out; median of repeats) and the
achieved rate. "before" runs the trainer of an earlier commit (``--before``, default the last one before the
token-row step) from a git worktree in a subprocess on the same features. Results: ``docs/results/speed.json``.

    python -m benchmarks.speed
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

import torch

from fuss_components.files import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
BACKBONES = {"vit_small_patch14": (384, 16), "vit_base_patch8": (768, 28)}  # (D', tokens per side at 224 px)
BEFORE = "30238ba"

# Runs in a subprocess with the trainer under test on sys.path: prints one JSON line of step seconds.
WORKER = r"""
import json, statistics, sys, time, torch
from fuss_components.config import FussConfig
from fuss_components.trainer import LocalTrainer
from fuss_components.site import init_global_state
from fuss_components.cache import TrainFeatures  # views.TrainFeatures since views.py; cache's own before
dim, side, images, precision, short, long, repeats = sys.argv[1:8]
dim, side, images, short, long, repeats = int(dim), int(side), int(images), int(short), int(long), int(repeats)
torch.manual_seed(0)
views = images * 5
feats = torch.randn(views, dim, side, side).half()
knn = torch.randint(views, (views, 7))
name = "vit_small_patch14_dinov2" if dim == 384 else "vit_base_patch8_224"
cfg = {"backbone": {"name": name}, "federation": {"rounds": 1}, "train": {"num_clusters": 27}}
if precision != "none":
    cfg["train"]["precision"] = precision
cfg = FussConfig.from_dict(cfg)
trainer = LocalTrainer(TrainFeatures(feats, [f"i{v // 5}" for v in range(views)], knn), cfg, "bench", 27)
state = init_global_state(cfg, 27)
def length(steps):
    started = time.perf_counter()
    trainer.train(state, 0, steps=steps)
    return time.perf_counter() - started
length(3)
per_step = [(length(long) - length(short)) / (long - short) for _ in range(repeats)]
print(json.dumps({"seconds_per_step": statistics.median(per_step), "repeats": per_step}))
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help="commit whose trainer is 'before' (empty: none)")
    parser.add_argument("--images", type=int, default=60, help="synthetic images of the site (5 views each)")
    parser.add_argument("--steps", type=int, nargs=2, default=[5, 25], metavar=("SHORT", "LONG"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--out", default=str(RESULTS / "speed.json"))
    return parser


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """GFLOP/s of ``(m, k) @ (k, n)`` in ``dtype`` on this machine."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - started) / 1e9


def head_rate(tokens: int, dim: int, out: int, dtype: torch.dtype) -> float:
    """The sgemm rate at the head's shapes: FLOP-weighted over its forward and backward products."""
    shapes = [(tokens, dim, dim), (tokens, dim, out), (tokens, dim, out),  # forward
              (dim, tokens, dim), (out, tokens, dim), (out, tokens, dim), (tokens, out, dim)]  # backward
    flops = [2 * m * k * n for m, k, n in shapes]
    seconds = sum(f / (matmul_rate(*s, dtype) * 1e9) for f, s in zip(flops, shapes))
    return sum(flops) / seconds / 1e9


def read_tokens(side: int, grid: int, maps: int, samples: int = 20) -> float:
    """Mean number of distinct tokens that ``grid x grid`` random bilinear points read on ``maps`` maps."""
    from fuss_components.losses import bilinear_corners, random_grid

    gen = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(samples):
        index, _ = bilinear_corners(random_grid(maps, grid, gen), side, side)
        index = index + (torch.arange(maps) * side * side)[:, None, None]
        counts.append(len(torch.unique(index)))
    return statistics.mean(counts)


def step_flops(dim: int, side: int, out: int = 70, batch: int = 8, random: int = 5, grid: int = 11) -> dict:
    """FLOPs of one stego step, from the shapes: what it must do (head on the query maps and the partner tokens
    the points read; correlations) and what the full-map step did (head on every partner map)."""
    hw, points = side * side, grid * grid
    partners = batch * (1 + random)

    def head(tokens: float) -> float:  # forward + weight gradients + the hidden layer's input gradient
        forward = 2 * tokens * (dim * dim + 2 * dim * out)
        return 2 * forward + 2 * tokens * out * dim

    pairs = batch * (2 + random)  # self, kNN, random pairs of point sets
    correlation = pairs * 2 * points * points * (dim + 3 * out)  # features; codes forward and backward
    read = read_tokens(side, grid, partners)
    return {"head_must": head(batch * hw + read), "head_full_maps": head((batch + partners) * hw),
            "correlations": correlation, "partner_tokens_read": read, "partner_tokens_all": partners * hw,
            "must": head(batch * hw + read) + correlation, "full_maps": head((batch + partners) * hw) + correlation}


def run_worker(path: Path | None, dim: int, side: int, precision: str, args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(path) if path is not None else str(REPO)
    env.pop("FUSS_SITE_POLICY", None)
    proc = subprocess.run([sys.executable, "-c", WORKER, str(dim), str(side), str(args.images), precision,
                           str(args.steps[0]), str(args.steps[1]), str(args.repeats)], capture_output=True,
                          text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"speed worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> dict:
    before_tree = None
    if args.before:
        before_tree = Path(tempfile.mkdtemp(prefix="fuss_before_"))
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before_tree), args.before],
                       check=True, capture_output=True)
    try:
        report = {"threads": torch.get_num_threads(), "cpu": _cpu_name(), "before": args.before, "backbones": {}}
        for name in args.backbones:
            dim, side = BACKBONES[name]
            flops = step_flops(dim, side)
            tokens = int(8 * side * side + flops["partner_tokens_read"])
            rates = {"float32": head_rate(tokens, dim, 70, torch.float32),
                     "bfloat16": head_rate(tokens, dim, 70, torch.bfloat16)}
            entry = {"shape": [dim, side, side], "flops": flops, "sgemm_gflops": rates, "runs": {}}
            runs = [("after", None, "float32"), ("after", None, "bfloat16")]
            if before_tree is not None:
                runs.insert(0, ("before", before_tree, "none"))
            for label, tree, precision in runs:
                seconds = run_worker(tree, dim, side, precision, args)["seconds_per_step"]
                work = flops["full_maps"] if label == "before" else flops["must"]
                rate = flops["must"] / seconds / 1e9  # on the FLOPs the step must do
                dtype = "float32" if precision in ("none", "float32") else "bfloat16"
                entry["runs"][f"{label}_{dtype}"] = {
                    "seconds_per_step": seconds, "gflops_done": work / seconds / 1e9, "gflops_on_must": rate,
                    "share_of_sgemm": rate / rates[dtype]}
                print(f"{name} {label} {dtype}: {seconds * 1000:.1f} ms a step, {rate:.0f} GFLOP/s on the step's "
                      f"{flops['must'] / 1e9:.1f} GFLOP ({100 * rate / rates[dtype]:.0f} % of sgemm "
                      f"{rates[dtype]:.0f})", flush=True)
            runs_ = entry["runs"]
            if "before_float32" in runs_:
                for key in ("after_float32", "after_bfloat16"):
                    runs_[key]["speedup"] = runs_["before_float32"]["seconds_per_step"] / runs_[key]["seconds_per_step"]
            report["backbones"][name] = entry
        atomic_write_json(Path(args.out), report)
        return report
    finally:
        if before_tree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)],
                           capture_output=True)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?")
    except OSError:
        return "?"


if __name__ == "__main__":
    main(get_args_parser().parse_args())
