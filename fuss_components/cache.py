"""Feature cache: one backbone pass per image per site, ever.

Layout: ``<cache_dir>/<kind>-<key>/<image id>.npy`` (float16), ``kind`` in ``train`` (five-crop views,
``(5, D', s/p, s/p)``) and ``eval`` (whole image, ``(D', h, w)``). The key hashes everything that changes the
numbers (backbone, weights sha256, block, preprocessing, dataset, format version), so a different setting never
reuses a stale cache. Each file is written atomically, so an interrupted extraction resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backbones import Backbone, backbone_identity, load_backbone
from .config import FussConfig
from .datasets import DataError, SegmentationDataset
from .paths import cache_dir
from .transforms import eval_view, five_crop_views

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
KINDS = ("train", "eval")
VIEWS_PER_IMAGE = 5


class CacheError(RuntimeError):
    """A cache file cannot be read or written; the message names the path."""


@dataclass
class TrainFeatures:
    """All training views of a set of images: ``feats`` (N_views, D', h, w) float16, five views per image."""

    feats: torch.Tensor
    view_image_ids: list[str]
    knn: torch.Tensor  # (N_views, k) indices of each view's nearest views (cosine), self excluded

    @property
    def num_views(self) -> int:
        return self.feats.shape[0]

    @property
    def num_images(self) -> int:
        return self.num_views // VIEWS_PER_IMAGE


def build_knn(feats: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Top-k neighbours of every view by cosine of its mean-pooled features, excluding itself."""
    desc = F.normalize(feats.float().mean(dim=(2, 3)), dim=1)
    n = desc.shape[0]
    k = min(k, n - 1)
    if k < 1:
        raise DataError(f"kNN needs at least 2 views, got {n}")
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, chunk):
        sim = desc[start:start + chunk] @ desc.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -float("inf")
        out[start:start + chunk] = sim.topk(k, dim=1).indices
    return out


class FeatureCache:
    """Builds and reads the cached backbone features of one site (see module docstring)."""

    def __init__(self, cfg: FussConfig, dataset_name: str | None = None):
        self.cfg = cfg
        self.root = cache_dir(cfg.cache_dir)
        self.dataset_name = dataset_name or cfg.data.dataset
        self._identity = backbone_identity(cfg.backbone)

    def key(self, kind: str) -> str:
        if kind == "train":
            prep = {"train_size": self.cfg.data.train_size, "crop_ratio": self.cfg.data.crop_ratio}
        elif kind == "eval":
            prep = {"eval_short_side": self.cfg.data.eval_short_side}
        else:
            raise ValueError(f"unknown cache kind {kind!r}")
        blob = json.dumps({"format": CACHE_FORMAT, "backbone": self._identity, "dataset": self.dataset_name,
                           "kind": kind, **prep}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def dir(self, kind: str) -> Path:
        return self.root / f"{kind}-{self.key(kind)}"

    def path(self, kind: str, image_id: str) -> Path:
        return self.dir(kind) / f"{image_id}.npy"

    def is_valid(self, kind: str, image_id: str) -> bool:
        """True when the file exists and its header and length are intact (a truncated file is not)."""
        path = self.path(kind, image_id)
        if not path.is_file():
            return False
        try:
            np.load(path, mmap_mode="r")
            return True
        except (ValueError, OSError, EOFError):
            log.warning("feature cache file %s is damaged; it will be rebuilt", path)
            return False

    def missing(self, kind: str, ids: Iterable[str]) -> list[str]:
        return [i for i in ids if not self.is_valid(kind, i)]

    def ensure(self, dataset: SegmentationDataset, ids: Sequence[str], kinds: Sequence[str] = ("train",),
               backbone: Backbone | None = None, device: str | torch.device = "cpu", batch_images: int = 4,
               progress: bool = True, desc: str = "") -> dict[str, int]:
        """Extract the features of every id that is not cached yet; returns counts per kind.

        The backbone is only loaded when something is missing.
        """
        counts = {}
        for kind in kinds:
            todo = self.missing(kind, ids)
            counts[kind] = len(todo)
            if not todo:
                continue
            if backbone is None:
                backbone = load_backbone(self.cfg.backbone, device)
            self._extract(dataset, todo, kind, backbone, batch_images, progress, desc)
        return counts

    def _extract(self, dataset: SegmentationDataset, ids: list[str], kind: str, backbone: Backbone,
                 batch_images: int, progress: bool, desc: str) -> None:
        data = self.cfg.data
        if kind == "train" and data.train_size % backbone.patch_size:
            raise DataError(f"data.train_size={data.train_size} is not a multiple of the patch size "
                            f"{backbone.patch_size}")
        out_dir = self.dir(kind)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._write_info(out_dir, kind)
        device = next(backbone.model.parameters()).device
        bar = tqdm(total=len(ids), desc=f"extract {kind} {desc}".strip(), unit="img", disable=not progress)
        start = time.perf_counter()
        pending_ids: list[str] = []
        pending: list[torch.Tensor] = []

        def flush() -> None:
            feats = backbone.features(torch.cat(pending).to(device)).to("cpu", torch.float16)
            per_image = feats.split(VIEWS_PER_IMAGE) if kind == "train" else feats.split(1)
            for image_id, f in zip(pending_ids, per_image):
                self._save(self.path(kind, image_id), f.numpy() if kind == "train" else f[0].numpy())
            bar.update(len(pending_ids))
            pending_ids.clear()
            pending.clear()

        for image_id in ids:
            try:
                image = dataset.load_image(image_id)
                if kind == "train":
                    views = five_crop_views(image, data.crop_ratio, data.train_size)
                else:
                    views = eval_view(image, data.eval_short_side, backbone.patch_size)[None]
            except Exception:
                if pending:  # keep the images read before the failing one: a rerun resumes right at it
                    flush()
                raise
            # whole-image views of different sizes cannot share a batch
            if pending and (len(pending_ids) >= batch_images or views.shape[-2:] != pending[0].shape[-2:]):
                flush()
            pending_ids.append(image_id)
            pending.append(views)
        if pending:
            flush()
        bar.close()
        log.info("extracted %d %s images in %.1f s into %s", len(ids), kind, time.perf_counter() - start, out_dir)

    def _write_info(self, out_dir: Path, kind: str) -> None:
        info = {"format": CACHE_FORMAT, "kind": kind, "backbone": self._identity, "dataset": self.dataset_name,
                "backbone_config": self.cfg.to_dict()["backbone"], "data_config": self.cfg.to_dict()["data"]}
        info_path = out_dir / "cache.json"
        if not info_path.exists():
            _atomic_write(info_path, lambda f: f.write(json.dumps(info, indent=2).encode()))

    @staticmethod
    def _save(path: Path, array: np.ndarray) -> None:
        _atomic_write(path, lambda f: np.save(f, array))

    def load_train(self, ids: Sequence[str], knn: int) -> TrainFeatures:
        """Stack the cached training views of ``ids`` (all must be cached) and compute their kNN lists."""
        arrays, view_ids = [], []
        for image_id in ids:
            arrays.append(self._load(self.path("train", image_id)))
            view_ids.extend([image_id] * VIEWS_PER_IMAGE)
        if not arrays:
            raise DataError("no training images to load")
        feats = torch.from_numpy(np.concatenate(arrays))
        return TrainFeatures(feats, view_ids, build_knn(feats, knn))

    def load_eval(self, image_id: str) -> torch.Tensor:
        """Cached whole-image features ``(D', h, w)`` float16 of one image."""
        return torch.from_numpy(self._load(self.path("eval", image_id)))

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError) as err:
            raise CacheError(f"cannot read cached features {path} ({err}); run `fuss extract` to rebuild") from err


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise CacheError(f"cannot write feature cache file {path}: {err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
