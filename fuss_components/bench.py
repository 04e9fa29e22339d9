"""Benchmarks that write figures (ratios from one run, since these machines are noisy)."""

from __future__ import annotations

import platform
import resource
import tempfile
import time

import torch

from .backbones import load_backbone
from .cache import VIEWS_PER_IMAGE, FeatureCache
from .config import FussConfig
from .site import open_site_dataset, resolve_partition
from .trainer import resolve_device
from .transforms import five_crop_views


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
