"""Feature cache: one backbone pass per image per site, ever.

Layout: ``<cache_dir>/<kind>-<key>/<image id>.npy`` (float16), ``kind`` in ``train`` (five-crop views,
``(5, D', s/p, s/p)``), ``eval`` (whole image, ``(D', h, w)``) and ``mirror`` (the whole image mirrored left-right,
its features mirrored back to the image's orientation, ``(D', h, w)``; only with ``data.eval_flip``). The key hashes everything that changes the
numbers (backbone, weights sha256, block, preprocessing, dataset, format version), so a different setting never
reuses a stale cache. Each file is written atomically, so an interrupted extraction resumes where it stopped.

Integrity: beside every ``<image id>.npy`` a sidecar ``<image id>.npy.sha256`` records the file's size and sha256.
The sidecar is written first and the data file last (any older data file is removed before), so a write that
fails half-way (disk full, permission, crash) leaves either nothing or a data file whose checksum cannot match:
never a file a later run would trust. A file is valid only when its size and sha256 match its sidecar and its
array has the shape the cache key implies (``train``: ``(5, D', s/p, s/p)``; ``eval``: ``(D', h, w)``; ``D'`` and
``p`` from the backbone's architecture); anything else is rebuilt by :meth:`FeatureCache.ensure`, and loading it
raises :class:`CacheError` naming the file. That includes a data file without a sidecar, whatever its content: a
deleted or lost sidecar must never turn corrupted bytes into trusted ones, so such a file is re-extracted, never
adopted (caches written before sidecars existed are rebuilt once).

Bad images: before any backbone pass, :meth:`FeatureCache.check` reads the headers of the files the pass and the
evaluation will read (``SegmentationDataset.check``): every image to extract, and for ``eval`` every label too.
``data.on_bad_image`` = ``"fail"`` stops at the first problem with the file's path, before anything is extracted;
``"skip"`` logs the path, leaves the image out and records it with the reason in :attr:`FeatureCache.skipped`.
An image whose header reads but whose data does not (a truncated file) is caught when it is read, under the same
policy (with ``"fail"`` the images read before it are kept).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import time
from functools import cached_property
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backbones import Backbone, backbone_identity, feature_dim, load_backbone, patch_size
from .config import FussConfig
from .datasets import DataError, SegmentationDataset
from .files import atomic_write_bytes, sha256_file
from .paths import cache_dir
from .transforms import eval_size, eval_view, five_crop_views
from .views import VIEWS_PER_IMAGE, FileViews, MemoryViews, TrainFeatures, descriptors, knn_from_descriptors

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
KINDS = ("train", "eval", "mirror")
WHOLE_IMAGE_KINDS = ("eval", "mirror")
KNN_FORMAT = 1  # version of the kNN definition (fuss_components.views), part of a kNN file's key
STORAGE_MODES = ("memory", "stream")
CHECKSUM_SUFFIX = ".sha256"  # sidecar: <image id>.npy.sha256 = {"sha256": hex, "size": bytes}


class CacheError(RuntimeError):
    """A cache file cannot be read or written; the message names the path."""


class FeatureCache:
    """Builds and reads the cached backbone features of one site (see module docstring)."""

    def __init__(self, cfg: FussConfig, dataset_name: str | None = None):
        self.cfg = cfg
        self.root = cache_dir(cfg.cache_dir)
        self.dataset_name = dataset_name or cfg.data.dataset
        self._identity = backbone_identity(cfg.backbone)
        # ids left out as bad (data.on_bad_image = "skip"), per kind: {id: reason naming the file}
        self.skipped: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self._checked: dict[str, set[str]] = {kind: set() for kind in KINDS}  # ids whose files passed check()
        # files whose sha256 matched in this process: path -> (size, mtime_ns); read again, they are not re-hashed
        self._verified: dict[Path, tuple[int, int]] = {}
        # evaluation features kept in memory after their first read (every round validates the same images)
        self.memo_bytes = 1 << 30
        self._memo: dict[tuple[str, str], torch.Tensor] = {}
        self._memo_used = 0
        self._input_sizes: dict[str, tuple[int, int]] = {}  # whole-image backbone input sizes, by id

    def key(self, kind: str) -> str:
        if kind == "train":
            prep = {"train_size": self.cfg.data.train_size, "crop_ratio": self.cfg.data.crop_ratio}
        elif kind in WHOLE_IMAGE_KINDS:
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

    @staticmethod
    def checksum_path(path: Path) -> Path:
        """The sidecar of a cache file: ``<image id>.npy.sha256``."""
        return path.with_name(path.name + CHECKSUM_SUFFIX)

    @cached_property
    def _geometry(self) -> tuple[int, int] | None:
        """``(D', patch size)`` of the backbone from its architecture (no weights); None when it cannot be built."""
        try:
            return feature_dim(self.cfg.backbone), patch_size(self.cfg.backbone)
        except Exception as err:  # e.g. an unknown model name (load_backbone reports it): check ndim / views only
            log.debug("feature cache: no geometry for backbone %s (%s)", self.cfg.backbone.name, err)
            return None

    def expected_shape(self, kind: str) -> tuple[int | str, ...]:
        """The shape a cached array of ``kind`` must have: a number where the cache key fixes it, a name where it
        varies per image (``eval``'s h, w) or the backbone's architecture is unknown."""
        dim, patch = self._geometry or ("D'", None)
        if kind == "train":
            side = self.cfg.data.train_size // patch if patch else "s/p"
            return (VIEWS_PER_IMAGE, dim, side, side)
        if kind in WHOLE_IMAGE_KINDS:
            return (dim, "h", "w")
        raise ValueError(f"unknown cache kind {kind!r}")

    def shape_problem(self, kind: str, shape: tuple[int, ...]) -> str | None:
        """``"shape (...), expected (...)"`` when ``shape`` is not :meth:`expected_shape`, else None."""
        want = self.expected_shape(kind)
        if len(shape) != len(want) or any(isinstance(w, int) and s != w for s, w in zip(shape, want)):
            return f"shape {tuple(shape)}, expected ({', '.join(map(str, want))})"
        return None

    def damage(self, kind: str, image_id: str, verify: bool = True) -> str | None:
        """Why the cached file of ``image_id`` cannot be trusted (``"missing"``, no or unreadable sidecar, size or
        checksum mismatch, not a ``.npy`` file, wrong shape), or None when it is intact (see module doc).
        ``verify=False`` skips the sha256 (the file's one full read is then its load, which checks it); a file
        verified before in this process is not hashed again."""
        path = self.path(kind, image_id)
        if not path.is_file():
            return "missing"
        sidecar = self.checksum_path(path)
        expected = _read_checksum(sidecar)
        if expected is None:
            return f"its checksum file {sidecar.name} is missing (unverifiable data is never trusted)"
        if expected == {}:
            return f"its checksum file {sidecar.name} is unreadable"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"size {size} bytes, expected {expected['size']}"
        if verify and not self._is_verified(path):
            digest = sha256_file(path)
            if digest != expected["sha256"]:
                return f"sha256 {digest[:12]}..., expected {expected['sha256'][:12]}..."
            self._mark_verified(path)
        try:
            shape = np.load(path, mmap_mode="r").shape  # reads the header only
        except (ValueError, OSError, EOFError) as err:
            return f"not a readable .npy file ({err})"
        return self.shape_problem(kind, shape)

    def _is_verified(self, path: Path) -> bool:
        stat = path.stat()
        return self._verified.get(path) == (stat.st_size, stat.st_mtime_ns)

    def _mark_verified(self, path: Path) -> None:
        stat = path.stat()
        self._verified[path] = (stat.st_size, stat.st_mtime_ns)

    def is_valid(self, kind: str, image_id: str, verify: bool = True) -> bool:
        """True when the file exists, its size and sha256 match its sidecar and its array has the expected shape
        (truncated, corrupted, no sidecar, wrong shape: False); ``verify``: see :meth:`damage`."""
        reason = self.damage(kind, image_id, verify)
        if reason is not None and reason != "missing":
            log.warning("feature cache file %s is damaged (%s); it will be rebuilt", self.path(kind, image_id),
                        reason)
        return reason is None

    def missing(self, kind: str, ids: Iterable[str], verify: bool = True) -> list[str]:
        return [i for i in ids if not self.is_valid(kind, i, verify)]

    def check(self, dataset: SegmentationDataset, ids_by_kind: Mapping[str, Sequence[str]],
              desc: str = "") -> dict[str, dict[str, str]]:
        """The checks that can run before a backbone pass (module docstring), for every kind before any extraction.

        Every id must be the dataset's and listed once. Checked, once per id and process: for ``train`` the
        images without a cache file yet (what extraction reads); for ``eval`` and ``mirror`` every image and, on a
        labelled dataset, its label (what evaluation reads). Under
        ``data.on_bad_image="fail"`` the first problem raises ``DataError`` naming the file; under ``"skip"`` each
        problem is logged and recorded in :attr:`skipped`. Returns the problems found now, ``{kind: {id: reason}}``.
        """
        found = {}
        for kind, ids in ids_by_kind.items():
            dataset.check_ids(ids)  # all of them, cached or not
            labels = kind in WHOLE_IMAGE_KINDS and dataset.has_labels  # the mirror view is evaluated like eval's
            todo = [i for i in ids if i not in self._checked[kind] and i not in self.skipped[kind]
                    and (labels or not self.path(kind, i).is_file())]
            problems = dataset.check(todo, labels=labels, on_bad_image=self.cfg.data.on_bad_image)
            for image_id, reason in problems.items():
                if kind != "mirror" or image_id not in self.skipped["eval"]:  # said once per image
                    log.warning("%s: skipping image %s: %s (data.on_bad_image='skip')", desc or kind, image_id,
                                reason)
            self.skipped[kind].update(problems)
            self._checked[kind].update(i for i in todo if i not in problems)
            if problems:
                found[kind] = problems
        return found

    def ensure(self, dataset: SegmentationDataset, ids: Sequence[str], kinds: Sequence[str] = ("train",),
               backbone: Backbone | None = None, device: str | torch.device = "cpu", batch_images: int | None = None,
               progress: bool = True, desc: str = "", verify: bool = True) -> dict[str, int]:
        """Extract the features of every id that is not cached yet; returns counts per kind (see
        :meth:`ensure_each`)."""
        return self.ensure_each(dataset, {kind: ids for kind in kinds}, backbone, device, batch_images, progress,
                                desc, verify)

    def ensure_each(self, dataset: SegmentationDataset, ids_by_kind: Mapping[str, Sequence[str]],
                    backbone: Backbone | None = None, device: str | torch.device = "cpu",
                    batch_images: int | None = None, progress: bool = True, desc: str = "",
                    verify: bool = True) -> dict[str, int]:
        """:meth:`check` every kind's ids, then extract the features of those not cached yet; returns the count
        extracted per kind.

        The backbone is only loaded when something is missing. Images this object already skipped as bad
        (``data.on_bad_image = "skip"``) are not retried; a new process retries them once. ``verify=False``:
        files that exist with a matching sidecar, size and shape count as cached without their sha256, for a
        caller whose load checks it (``load_train`` with ``rebuild``). ``batch_images``: images a backbone batch
        (default ``data.extract_batch``); an image's eval and mirror views are computed in one pass.
        """
        self.check(dataset, ids_by_kind, desc)
        todo = {kind: self.missing(kind, self.usable(kind, ids), verify) for kind, ids in ids_by_kind.items()}
        self.check_disk(dataset, todo)
        batch_images = batch_images or extraction_batch(self.cfg.data.extract_batch, torch.device(device))
        for kinds, ids in extraction_passes(todo):
            if backbone is None:
                backbone = load_backbone(self.cfg.backbone, device)
            self._extract(dataset, ids, kinds, backbone, batch_images, progress, desc)
        return {kind: len(ids) for kind, ids in todo.items()}

    def bytes_needed(self, dataset: SegmentationDataset, kind: str, ids: Sequence[str]) -> int:
        """Bytes the cache files of ``ids`` take (data and sidecars): training views from the cache key's shape,
        whole-image views from each image's size (read from its header)."""
        dim, patch = self._geometry or (None, None)
        if dim is None:
            return 0
        header = 128 + 100  # .npy header and the sidecar
        if kind == "train":
            side = self.cfg.data.train_size // patch
            return len(ids) * (VIEWS_PER_IMAGE * dim * side * side * 2 + header)
        total = 0
        for image_id in ids:
            h, w = self._input_size(dataset, image_id, patch)
            total += dim * (h // patch) * (w // patch) * 2 + header
        return total

    def check_disk(self, dataset: SegmentationDataset, todo: Mapping[str, Sequence[str]]) -> None:
        """Before any extraction: CacheError naming the cache folder when its disk has less free space than the
        features still to extract need."""
        needed = sum(self.bytes_needed(dataset, kind, ids) for kind, ids in todo.items() if ids)
        if not needed:
            return
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise CacheError(f"feature cache folder {self.root}: extracting {sum(map(len, todo.values()))} image(s) "
                             f"needs {needed / 1e9:.2f} GB, its disk has {free / 1e9:.2f} GB free; free space or "
                             f"set cache_dir (or $FUSS_CACHE_DIR) to a larger disk")

    def usable(self, kind: str, ids: Sequence[str]) -> list[str]:
        """``ids`` without the ones skipped as bad (after :meth:`check` / :meth:`ensure`), in their order."""
        return [i for i in ids if i not in self.skipped[kind]]

    def _extract(self, dataset: SegmentationDataset, ids: list[str], kinds: tuple[str, ...], backbone: Backbone,
                 batch_images: int, progress: bool, desc: str) -> None:
        """Extract ``kinds`` (``("train",)``, or whole-image kinds computed in one pass: an image and its mirror image
        share a batch) of ``ids``. Images are decoded and resized by ``data.extract_workers`` DataLoader workers
        (pinned memory on a GPU), in batches of ``batch_images`` images; whole images are taken in order of their
        backbone input size, so that images of one size share batches (COCO-Stuff's sizes vary per image)."""
        data = self.cfg.data
        if kinds == ("train",) and data.train_size % backbone.patch_size:
            raise DataError(f"data.train_size={data.train_size} is not a multiple of the patch size "
                            f"{backbone.patch_size}")
        for kind in kinds:
            out_dir = self.dir(kind)
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CacheError(f"cannot create feature cache folder {out_dir}: {err}") from err
            self._write_info(out_dir, kind)
        if kinds != ("train",):
            sizes = {i: self._input_size(dataset, i, backbone.patch_size) for i in ids}
            ids = sorted(ids, key=lambda i: sizes[i])  # stable: the dataset's order within one size
        device = next(backbone.model.parameters()).device
        workers = extraction_workers(data.extract_workers, device)
        inputs = _ExtractionInputs(dataset, ids, kinds, data, backbone.patch_size)
        loader = torch.utils.data.DataLoader(inputs, batch_size=None, num_workers=workers,
                                             pin_memory=device.type == "cuda",
                                             prefetch_factor=2 * batch_images if workers else None)
        per_image = VIEWS_PER_IMAGE if kinds == ("train",) else len(kinds)
        start = time.perf_counter()
        pending_ids: list[str] = []
        pending: list[torch.Tensor] = []
        label = "+".join(kinds)
        # closed on any exit, so that an error is printed on its own line
        bar = tqdm(total=len(ids), desc=f"extract {label} {desc}".strip(), unit="img", disable=not progress)

        def flush() -> None:
            feats = backbone.features(torch.cat(pending).to(device, non_blocking=True)).to("cpu", torch.float16)
            for image_id, f in zip(pending_ids, feats.split(per_image)):
                if kinds == ("train",):
                    self._save(self.path("train", image_id), f.numpy())
                    continue
                for kind, view in zip(kinds, f):
                    view = view.flip(-1) if kind == "mirror" else view  # mirrored back: aligned with the image
                    self._save(self.path(kind, image_id), view.numpy())
            bar.update(len(pending_ids))
            pending_ids.clear()
            pending.clear()

        with bar:
            batches = iter(loader)
            while True:
                try:
                    item = next(batches, None)
                except Exception:  # not a bad image (e.g. out of memory in a worker): keep what was read
                    if pending:
                        flush()
                    raise
                if item is None:
                    break
                image_id, views, err = item
                if err is not None:
                    if data.on_bad_image == "skip":
                        log.warning("%s: skipping image %s: %s (data.on_bad_image='skip')", desc or label, image_id,
                                    err)
                        for kind in kinds:
                            self.skipped[kind][image_id] = str(err)
                        bar.update(1)
                        continue
                    if pending:  # keep the images read before the failing one: a rerun resumes right at it
                        flush()
                    raise DataError(f"{err} (data.on_bad_image='fail'; 'skip' leaves such images out)") from err
                # whole-image views of different sizes cannot share a batch
                if pending and (len(pending_ids) >= batch_images or views.shape[-2:] != pending[0].shape[-2:]):
                    flush()
                pending_ids.append(image_id)
                pending.append(views)
            if pending:
                flush()
        log.info("extracted %d %s images in %.1f s into %s", len(ids), label, time.perf_counter() - start,
                 self.root)

    def _input_size(self, dataset: SegmentationDataset, image_id: str, patch: int) -> tuple[int, int]:
        """The backbone input size of a whole image, from its file header, read once per process (the disk check
        and the batching by size both need it, for eval and mirror alike)."""
        if image_id not in self._input_sizes:
            try:
                width, height = dataset.image_size(image_id)
            except DataError:
                return (0, 0)  # read (and reported) with the image itself
            self._input_sizes[image_id] = eval_size(height, width, self.cfg.data.eval_short_side, patch)
        return self._input_sizes[image_id]

    def _write_info(self, out_dir: Path, kind: str) -> None:
        info = {"format": CACHE_FORMAT, "kind": kind, "backbone": self._identity, "dataset": self.dataset_name,
                "backbone_config": self.cfg.to_dict()["backbone"], "data_config": self.cfg.to_dict()["data"]}
        info_path = out_dir / "cache.json"
        if not info_path.exists():
            _atomic_write(info_path, json.dumps(info, indent=2).encode())

    @classmethod
    def _save(cls, path: Path, array: np.ndarray) -> None:
        """Old data file out, sidecar in, data file in (each atomic): see the module docstring."""
        buf = io.BytesIO()
        np.save(buf, array)
        data = buf.getvalue()
        sidecar = cls.checksum_path(path)
        try:
            path.unlink(missing_ok=True)
            _atomic_write(sidecar, _checksum_blob(data))
            _atomic_write(path, data)
        except OSError as err:
            sidecar.unlink(missing_ok=True)
            raise CacheError(f"cannot write feature cache file {path}: {err}") from err
        except BaseException:
            sidecar.unlink(missing_ok=True)
            raise

    def load_train(self, ids: Sequence[str], knn: int, storage: str = "memory", device: str | torch.device = "cpu",
                   rebuild=None, progress: bool = False) -> TrainFeatures:
        """The cached training views of ``ids`` (all must be cached) and their kNN lists, each file read and
        checksummed once.

        ``storage``: ``"memory"`` fills one pool allocated up front (peak: the pool plus one file's arrays);
        ``"stream"`` keeps nothing and reads batches from the files while training (``views.FileViews``). The kNN
        lists are computed on ``device`` and cached beside the features (``knn-<key>.npy``, keyed by the ids, k and
        the kNN definition), so a restarted process reads them. ``rebuild(bad_ids)``: called with the ids whose
        files turn out damaged (each named in a warning and deleted first), so that they are re-extracted and read
        again; without it a damaged file raises :class:`CacheError` naming it."""
        if not ids:
            raise DataError("no training images to load")
        if storage not in STORAGE_MODES:
            raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
        knn_path = self.knn_path(ids, knn)
        neighbours = self._load_knn(knn_path, len(ids) * VIEWS_PER_IMAGE)
        pool, desc, offsets = None, None, [0] * len(ids)

        def read(i: int, image_id: str) -> None:
            nonlocal pool, desc
            array, offsets[i] = self._load_with_offset("train", image_id)
            views = torch.from_numpy(array)
            if pool is None and storage == "memory":
                pool = MemoryViews.empty(len(ids) * VIEWS_PER_IMAGE, *array.shape[1:])
            if pool is not None:
                pool.tokens[i * VIEWS_PER_IMAGE:(i + 1) * VIEWS_PER_IMAGE] = views.permute(0, 2, 3, 1)
            if neighbours is None:
                if desc is None:
                    # float32, V x D' x 4 bytes (1/(h w / 2) of the pool), only while the kNN is computed
                    desc = torch.empty(len(ids) * VIEWS_PER_IMAGE, array.shape[1])
                desc[i * VIEWS_PER_IMAGE:(i + 1) * VIEWS_PER_IMAGE] = descriptors(views)

        damaged = []
        for i, image_id in enumerate(tqdm(ids, desc="load train features", unit="img", disable=not progress)):
            try:
                read(i, image_id)
            except CacheError as err:
                if rebuild is None:
                    raise
                log.warning("%s; it is rebuilt", err)
                path = self.path("train", image_id)
                path.unlink(missing_ok=True)
                self.checksum_path(path).unlink(missing_ok=True)
                damaged.append((i, image_id))
        if damaged:
            rebuild([image_id for _, image_id in damaged])
            for i, image_id in damaged:
                read(i, image_id)
        if neighbours is None:
            neighbours = knn_from_descriptors(desc, knn, device)
            self._save_knn(knn_path, neighbours)
        view_ids = [image_id for image_id in ids for _ in range(VIEWS_PER_IMAGE)]
        if storage == "memory":
            return TrainFeatures(pool, view_ids, neighbours)
        first = np.load(self.path("train", ids[0]), mmap_mode="r")
        store = FileViews([self.path("train", i) for i in ids], offsets, *first.shape[1:])
        return TrainFeatures(store, view_ids, neighbours)

    def knn_path(self, ids: Sequence[str], k: int) -> Path:
        """Where the kNN lists of the training views of ``ids`` are cached."""
        blob = json.dumps({"format": KNN_FORMAT, "k": k, "ids": list(ids)})
        return self.dir("train") / f"knn-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npy"

    def _load_knn(self, path: Path, num_views: int) -> torch.Tensor | None:
        expected = _read_checksum(self.checksum_path(path))
        if not path.is_file() or not expected:
            return None
        data = path.read_bytes()
        if len(data) != expected["size"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            log.warning("kNN cache %s is damaged; it is recomputed", path)
            return None
        array = np.load(io.BytesIO(data))
        if array.ndim != 2 or array.shape[0] != num_views:
            return None
        return torch.from_numpy(array.astype(np.int64))

    def _save_knn(self, path: Path, neighbours: torch.Tensor) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._save(path, neighbours.numpy().astype(np.int32))
        except CacheError as err:  # a cache that cannot be written costs a recomputation, not the run
            log.warning("kNN lists not cached: %s", err)

    def load_eval(self, image_id: str) -> torch.Tensor:
        """Cached whole-image features ``(D', h, w)`` float16 of one image."""
        return self._load_whole("eval", image_id)

    def load_mirror(self, image_id: str) -> torch.Tensor:
        """Cached features of the mirrored whole image, mirrored back: ``(D', h, w)`` float16."""
        return self._load_whole("mirror", image_id)

    def _load_whole(self, kind: str, image_id: str) -> torch.Tensor:
        """An evaluation array, kept in memory (up to :attr:`memo_bytes` in all) after its first read: every
        round validates the same images."""
        key = (kind, image_id)
        if key in self._memo:
            return self._memo[key]
        value = torch.from_numpy(self._load(kind, image_id))
        if self._memo_used + value.nbytes <= self.memo_bytes:
            self._memo[key] = value
            self._memo_used += value.nbytes
        return value

    @property
    def eval_kinds(self) -> tuple[str, ...]:
        """The kinds evaluation reads: ``eval``, plus ``mirror`` with ``data.eval_flip``."""
        return WHOLE_IMAGE_KINDS if self.cfg.data.eval_flip else ("eval",)

    def _load(self, kind: str, image_id: str) -> np.ndarray:
        """The array of a cache file, after checking it against its sidecar (size and sha256, once per process)
        and its shape."""
        return self._load_with_offset(kind, image_id)[0]

    def _load_with_offset(self, kind: str, image_id: str) -> tuple[np.ndarray, int]:
        """:meth:`_load`, and the byte offset of the array's data in the file."""
        path = self.path(kind, image_id)
        hint = "re-extract it: rerun `fuss extract` (or the job), which rebuilds it"
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CacheError(f"cannot read cached features {path} ({err}); {hint}") from err
        expected = _read_checksum(self.checksum_path(path))
        if expected is None:
            raise CacheError(f"cached features {path} have no checksum file {self.checksum_path(path).name}, so "
                             f"they cannot be trusted; {hint}")
        if expected == {}:
            raise CacheError(f"the checksum file of cached features {path} is unreadable; {hint}")
        if len(data) != expected["size"]:
            raise CacheError(f"cached features {path} have {len(data)} bytes, their checksum file says "
                             f"{expected['size']} (truncated or replaced); {hint}")
        if not self._is_verified(path):
            if hashlib.sha256(data).hexdigest() != expected["sha256"]:
                raise CacheError(f"cached features {path} do not match their sha256 (corrupted); {hint}")
            self._mark_verified(path)
        try:
            array = np.load(io.BytesIO(data))
        except (OSError, ValueError, EOFError) as err:
            raise CacheError(f"cannot read cached features {path} ({err}); {hint}") from err
        problem = self.shape_problem(kind, array.shape)
        if problem is not None:
            raise CacheError(f"cached features {path} have {problem} (not what this cache's key implies); {hint}")
        return array, len(data) - array.nbytes  # a .npy file's data follow its header


def _checksum_blob(data: bytes) -> bytes:
    return json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}).encode()


def _read_checksum(path: Path) -> dict | None:
    """The sidecar's ``{"sha256", "size"}``; None when there is no sidecar; ``{}`` when it is unreadable."""
    try:
        blob = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    if not isinstance(blob, dict) or not isinstance(blob.get("sha256"), str) or not isinstance(blob.get("size"), int):
        return {}
    return blob


def _atomic_write(path: Path, data: bytes) -> None:
    """:func:`atomic_write_bytes`, with any OSError (disk full, permission, the folder is not a folder) as a
    :class:`CacheError` naming ``path``; ``path`` is left as it was (absent or the complete previous content)."""
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        what = "disk full" if err.errno == errno.ENOSPC else err.strerror or type(err).__name__
        raise CacheError(f"cannot write feature cache file {path}: {what} ({err})") from err


def extraction_workers(configured: int | None, device: torch.device) -> int:
    """``data.extract_workers``; None: none on the CPU (the backbone needs every core), on a GPU up to 4 processes
    that decode and resize while the device computes."""
    cores = os.cpu_count() or 1
    if configured is not None:
        return min(configured, cores)  # a job's value never starts more processes than the site has cores
    return 0 if device.type == "cpu" else max(0, min(4, cores - 1))


def extraction_batch(configured: int | None, device: torch.device) -> int:
    """``data.extract_batch``; None: 4 images a batch on the CPU, 16 on a GPU."""
    return configured or (4 if device.type == "cpu" else 16)


def extraction_passes(todo: Mapping[str, Sequence[str]]) -> list[tuple[tuple[str, ...], list[str]]]:
    """The backbone passes that extract ``todo`` ({kind: ids}): ``train`` alone; the whole-image kinds grouped by
    image, so that an image missing both its ``eval`` and ``mirror`` features is read once and both views share a
    batch."""
    passes = [(("train",), list(todo["train"]))] if todo.get("train") else []
    groups: dict[tuple[str, ...], list[str]] = {}
    wanted = {kind: set(todo.get(kind, ())) for kind in WHOLE_IMAGE_KINDS}
    seen = set()
    for kind in WHOLE_IMAGE_KINDS:
        for image_id in todo.get(kind, ()):
            if image_id not in seen:
                seen.add(image_id)
                groups.setdefault(tuple(k for k in WHOLE_IMAGE_KINDS if image_id in wanted[k]), []).append(image_id)
    return passes + list(groups.items())


class _ExtractionInputs(torch.utils.data.Dataset):
    """The backbone inputs of each image, made in DataLoader workers: ``(id, views, None)``, or ``(id, None,
    error)`` for an image that cannot be read (the caller applies ``data.on_bad_image``). ``views``: the five
    training crops, or per whole-image kind the image (``eval``) and/or its mirror image (``mirror``)."""

    def __init__(self, dataset: SegmentationDataset, ids: Sequence[str], kinds: tuple[str, ...], data, patch: int):
        self.dataset, self.ids, self.kinds, self.data, self.patch = dataset, list(ids), kinds, data, patch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        try:
            image = self.dataset.load_image(image_id)
        except DataError as err:
            return image_id, None, err
        if self.kinds == ("train",):
            return image_id, five_crop_views(image, self.data.crop_ratio, self.data.train_size), None
        view = eval_view(image, self.data.eval_short_side, self.patch)
        return image_id, torch.stack([view.flip(-1) if kind == "mirror" else view for kind in self.kinds]), None
