"""One federation site, independent of transport: its images, its feature cache, its local trainer.

The FLARE client script and the in-process runners both drive sites through this class.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .backbones import feature_dim
from .cache import FeatureCache
from .config import FussConfig
from .datasets import DataError, SegmentationDataset, open_dataset
from .evaluate import evaluate_model
from .head import FussModel
from .partition import Partition, partition_by_site, preset_partition
from .paths import data_root
from .trainer import LocalResult, LocalTrainer, resolve_device, stable_seed

log = logging.getLogger(__name__)

SIMULATOR_NAME = re.compile(r"^site-(\d+)$")


def open_site_dataset(cfg: FussConfig, site: str | None = None) -> SegmentationDataset:
    """Open the configured dataset; a missing root is an error naming the site and the path."""
    root = data_root(cfg.data.root)
    try:
        return open_dataset(cfg.data.dataset, root)
    except (DataError, FileNotFoundError) as err:
        who = f"site {site!r}: " if site else ""
        raise DataError(f"{who}cannot open dataset {cfg.data.dataset!r} under data root {root}: {err}") from err


def resolve_partition(cfg: FussConfig, dataset: SegmentationDataset | None = None) -> Partition:
    """``cfg.partition`` is a manifest path, a preset (``camvid``, ``cityscapes:6``, ...), or ``site``: one client
    per site, where sites whose images are all in split ``test`` are validation-only sites."""
    spec = cfg.partition
    if spec.endswith(".json") or Path(spec).is_file():
        return Partition.load(spec)
    dataset = dataset or open_site_dataset(cfg)
    name, _, count = spec.partition(":")
    if name == "site":
        held_out = [s for s in dataset.sites() if {x.split for x in dataset.samples(site=s)} == {"test"}]
        return partition_by_site(dataset, validation_sites=held_out, seed=cfg.federation.seed)
    return preset_partition(name, dataset, seed=cfg.federation.seed, num_clients=int(count) if count else None)


def site_order(partition: Partition) -> list[str]:
    """Training sites, then validation-only sites: the order in which simulator names site-1.. map to them."""
    train = list(partition.clients)
    return train + [s for s in partition.validation if s not in partition.clients]


def resolve_site_name(name: str, partition: Partition) -> str:
    """A partition site name as is; a simulator name ``site-N`` -> the N-th site of :func:`site_order`."""
    order = site_order(partition)
    if name in order:
        return name
    match = SIMULATOR_NAME.match(name)
    if match and 1 <= int(match.group(1)) <= len(order):
        return order[int(match.group(1)) - 1]
    raise DataError(f"site {name!r} is not in the partition (sites: {order})")


def num_clusters(cfg: FussConfig, dataset: SegmentationDataset | None = None) -> int:
    """|C|: configured, else the dataset's number of classes."""
    if cfg.train.num_clusters is not None:
        return cfg.train.num_clusters
    return (dataset or open_site_dataset(cfg)).num_classes


def build_model(cfg: FussConfig, clusters: int | None = None) -> FussModel:
    """An (untrained) FussModel shaped by the configuration."""
    t = cfg.train
    return FussModel(feature_dim(cfg.backbone), t.dim, clusters or num_clusters(cfg), t.dropout)


def init_global_state(cfg: FussConfig, clusters: int | None = None) -> dict[str, torch.Tensor]:
    """The seeded initial global model (unit-norm random centroids); identical wherever it is computed."""
    in_dim, t = feature_dim(cfg.backbone), cfg.train  # before seeding: may build (and cache) a timm model
    clusters = clusters or num_clusters(cfg)
    torch.manual_seed(stable_seed(cfg.federation.seed, "init"))
    model = FussModel(in_dim, t.dim, clusters, t.dropout)
    with torch.no_grad():
        model.centroids.copy_(F.normalize(model.centroids, dim=1))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Site:
    """A site of the federation: trains on its ``clients`` images, validates on its ``validation`` images."""

    def __init__(self, cfg: FussConfig, name: str, partition: Partition | None = None,
                 dataset: SegmentationDataset | None = None):
        self.cfg = cfg
        self.dataset = dataset or open_site_dataset(cfg, name)
        self.partition = partition or resolve_partition(cfg, self.dataset)
        self.name = resolve_site_name(name, self.partition)
        self.train_ids = list(self.partition.clients.get(self.name, []))
        self.validation_ids = list(self.partition.validation.get(self.name, []))
        self.num_clusters = num_clusters(cfg, self.dataset)
        self.cache = FeatureCache(cfg, self.dataset.name)
        self.device = resolve_device(cfg.train.device)
        self._trainer: LocalTrainer | None = None

    @property
    def is_training_site(self) -> bool:
        return bool(self.train_ids)

    @property
    def is_validation_site(self) -> bool:
        return bool(self.validation_ids)

    @property
    def num_samples(self) -> int:
        return len(self.train_ids)

    def prepare(self, progress: bool = True) -> dict[str, int]:
        """Extract whatever features this site still lacks (training views and/or evaluation views)."""
        counts = {}
        if self.train_ids:
            counts.update(self.cache.ensure(self.dataset, self.train_ids, ["train"], device=self.device,
                                            progress=progress, desc=self.name))
        if self.validation_ids:
            counts.update(self.cache.ensure(self.dataset, self.validation_ids, ["eval"], device=self.device,
                                            progress=progress, desc=self.name))
        return counts

    @property
    def trainer(self) -> LocalTrainer:
        if self._trainer is None:
            if not self.train_ids:
                raise DataError(f"site {self.name!r} has no training images in the partition")
            self.cache.ensure(self.dataset, self.train_ids, ["train"], device=self.device, desc=self.name)
            feats = self.cache.load_train(self.train_ids, self.cfg.train.knn)
            self._trainer = LocalTrainer(feats, self.cfg, self.name, self.num_clusters)
        return self._trainer

    def train(self, global_state: dict[str, torch.Tensor], round_idx: int) -> LocalResult:
        """One round of local training from the received global state."""
        return self.trainer.train(global_state, round_idx)

    def validate(self, global_state: dict[str, torch.Tensor], crf: bool = False, overlay_dir: str | Path | None = None,
                 num_overlays: int = 0, progress: bool = False) -> dict:
        """Hungarian-matched mIoU / pixel accuracy of ``global_state`` on this site's validation images."""
        if not self.validation_ids:
            raise DataError(f"site {self.name!r} has no validation images in the partition")
        self.cache.ensure(self.dataset, self.validation_ids, ["eval"], device=self.device, desc=self.name)
        model = build_model(self.cfg, self.num_clusters)
        model.load_state_dict(global_state)
        return evaluate_model(model.eval(), self.dataset, self.validation_ids, self.cache, self.num_clusters,
                              crf=crf, overlay_dir=overlay_dir, num_overlays=num_overlays, progress=progress)
