"""Efficiency benchmarks that write their figures to a JSON file (ratios from one run, since these machines are
noisy): the feature-cache builder against a bare backbone loop, and the FLARE simulator against the in-process
federation.

    python -m benchmarks.bench extract --images 48 --batch-images 4 --out docs/results/bench_extract.json
    python -m benchmarks.bench flare --rounds 3 --threads-per-site 1 --out docs/results/bench_flare.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.paper import backbone_caveat, base_config, git_commit, run_command, simulate
from fuss_components.backbones import load_backbone
from fuss_components.cache import FeatureCache
from fuss_components.views import VIEWS_PER_IMAGE
from fuss_components.config import FussConfig, parse_overrides
from fuss_components.files import atomic_write_json
from fuss_components.site import open_site_dataset, resolve_partition
from fuss_components.trainer import resolve_device
from fuss_components.transforms import five_crop_views


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_extract(cfg: FussConfig, num_images: int = 48, batch_images: int = 4) -> dict:
    """Throughput of the cache builder (decode + five-crop + forward + write) against a bare
    ``model.forward_features`` loop over the same, already preprocessed views, same threads and batch size.

    Also reported: the bare loop stopped at the configured block (what the builder computes), and peak RSS.
    """
    dataset = open_site_dataset(cfg)
    partition = resolve_partition(cfg, dataset)
    ids = [i for site in partition.clients.values() for i in site][:num_images]
    device = resolve_device(cfg.train.device)
    backbone = load_backbone(cfg.backbone, device)
    views = [five_crop_views(dataset.load_image(i), cfg.data.crop_ratio, cfg.data.train_size) for i in ids]
    batches = [torch.cat(views[s:s + batch_images]).to(device) for s in range(0, len(views), batch_images)]

    def bare(fn) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                fn(batch)
        return time.perf_counter() - start

    bare(backbone.model.forward_features)  # warm-up (allocator, kernels)
    t_forward_features = bare(backbone.model.forward_features)
    t_same_block = bare(backbone.features)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(cfg.with_overrides({"cache_dir": tmp}), dataset.name)
        start = time.perf_counter()
        cache.ensure(dataset, ids, ["train"], backbone=backbone, batch_images=batch_images, progress=False)
        t_builder = time.perf_counter() - start
    n_views = len(ids) * VIEWS_PER_IMAGE
    return {
        "images": len(ids), "views": n_views, "batch_views": batch_images * VIEWS_PER_IMAGE,
        "threads": torch.get_num_threads(), "device": str(device), "backbone": cfg.backbone.name,
        "block": backbone.block, "num_blocks": len(backbone.model.blocks), "train_size": cfg.data.train_size,
        "builder_images_per_s": len(ids) / t_builder,
        "bare_forward_features_images_per_s": len(ids) / t_forward_features,
        "bare_same_block_images_per_s": len(ids) / t_same_block,
        "ratio_vs_forward_features": t_forward_features / t_builder,
        "ratio_vs_same_block": t_same_block / t_builder,
        "peak_rss_mb": _peak_rss_mb(), "cpu": platform.processor() or platform.machine(),
    }


def bench_flare(out_file: str | Path, work_dir: str | Path, rounds: int = 3, local_steps: int | None = None,
                threads_per_site: int | None = None, overrides: dict | None = None) -> dict:
    """Wall time of the camvid federation through the FLARE simulator vs the in-process reference federation,
    same configuration (default: one local epoch per round) and seeds; also the final models' difference,
    both validation mIoUs, the bytes a client sends per round and the backbone's size."""
    from fuss_components.checkpoint import read_model_file
    from fuss_components.runner import run_federated

    budget = {"rounds": rounds, "local_steps": local_steps, "local_epochs": 1.0}
    cfg = base_config("camvid", budget, 0, overrides)
    work_dir = Path(work_dir)
    started = time.perf_counter()
    ref = run_federated(cfg, work_dir / "inprocess", progress=True)
    t_inprocess = time.perf_counter() - started
    sim = simulate(cfg, work_dir, "camvid_flare", threads_per_site)
    flare_state = read_model_file(sim.model_file).state
    ref_state = read_model_file(work_dir / "inprocess" / "model.pt").state
    max_diff = max(float((flare_state[k] - v).abs().max()) for k, v in ref_state.items())
    backbone = load_backbone(cfg.backbone, torch.device("cpu"))
    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    sent = [e["bytes"] for r in sim.metrics["rounds"] for e in r["train"].values()
            if e.get("param_keys")]  # training updates (a validation-only site's result carries no parameters)
    result = {
        "rounds": rounds, "local_steps": local_steps or "1 epoch", "threads": torch.get_num_threads(),
        "simulator_threads_per_site": threads_per_site, "inprocess_seconds": t_inprocess,
        "flare_seconds": sim.seconds, "flare_over_inprocess": sim.seconds / t_inprocess,
        "inprocess_val_miou": [r["miou"] for r in ref["rounds"]],
        "flare_val_miou": [r.get("val_miou") for r in sim.metrics["rounds"]],
        "max_abs_model_difference": max_diff, "bytes_per_client_round": statistics.mean(sent),
        "backbone_bytes": backbone_bytes, "bytes_over_backbone": statistics.mean(sent) / backbone_bytes,
        "simulator_restarts": sim.restarts, "commit": git_commit(),
        "caveat": backbone_caveat(FussConfig().backbone.block),
    }
    atomic_write_json(out_file, result)
    return result


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", add_help=add_help,
                                     description="Efficiency benchmarks that write their figures to a JSON file.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("extract", help="feature-extraction throughput vs a bare backbone loop, peak RSS")
    p.add_argument("--config", help="JSON config file (default: built-in defaults = the camvid setting)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--images", type=int, default=48, help="number of images")
    p.add_argument("--batch-images", type=int, default=4)
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p = sub.add_parser("flare", help="FLARE simulator vs in-process federation (camvid): wall time, bytes, parity")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key of the camvid preset (repeatable)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, help="default: one local epoch per round")
    p.add_argument("--threads-per-site", type=int, help="OMP_NUM_THREADS of the simulator's site processes")
    p.add_argument("--work", default="runs/bench_flare")
    p.add_argument("--out", required=True, help="JSON file for the figures")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = parse_overrides(args.set)
    if args.what == "flare":
        result = bench_flare(args.out, args.work, args.rounds, args.local_steps, args.threads_per_site, overrides)
    else:
        cfg = FussConfig.load(args.config) if args.config else FussConfig()
        result = bench_extract(cfg.with_overrides(overrides) if overrides else cfg, args.images, args.batch_images)
        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(get_args_parser(), main))
