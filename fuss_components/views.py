"""A site's training views as training reads them: held in memory or streamed from the cache files, plus their
nearest neighbours.

Training reads views by index, a batch at a time. :class:`TrainFeatures` hides where they live:

* :class:`MemoryViews`: one float16 tensor ``(V, h, w, D')`` (channels last: a view's tokens are rows of one
  matrix, what the head's matrix products read), allocated once and filled file by file, optionally in GPU
  memory;
* :class:`FileViews`: nothing held; each batch is read from the site's cache files by positional reads (a view
  of an image is one contiguous block of its ``.npy`` file), so memory stays at a few batches whatever the site's
  size. :class:`Prefetcher` reads the next batches on a thread while the current one trains.

Both return the same numbers for the same indices, so training is identical in both modes.

kNN (``train.knn`` nearest views of every view by cosine of the mean-pooled features, self excluded) is computed
from the views' descriptors in chunks on the site's device, exactly up to :data:`EXACT_KNN_MAX_VIEWS` views and
above that in two stages (the nearest images by their mean descriptor, then the exact nearest views among those
images' views), and cached beside the features by ``FeatureCache``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

VIEWS_PER_IMAGE = 5
EXACT_KNN_MAX_VIEWS = 100_000  # above: two-stage kNN (image neighbours first), O(images^2) instead of O(views^2)
CANDIDATE_IMAGES = 32  # two-stage kNN: the nearest images whose views are searched exactly
KNN_CHUNK_BYTES = 16 << 20  # similarity rows computed at a time: bounds the kNN's memory for any V


class MemoryViews:
    """Views in one tensor ``(V, h, w, D')`` float16, on the CPU or a device."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    @classmethod
    def empty(cls, num_views: int, dim: int, h: int, w: int) -> "MemoryViews":
        return cls(torch.empty(num_views, h, w, dim, dtype=torch.float16))

    @property
    def num_views(self) -> int:
        return self.tokens.shape[0]

    @property
    def geometry(self) -> tuple[int, int, int]:
        """``(D', h, w)``."""
        return self.tokens.shape[3], self.tokens.shape[1], self.tokens.shape[2]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The views ``index`` ``(B, h, w, D')`` float16, where the store lives."""
        return self.tokens[index.to(self.tokens.device)]

    def to(self, device: torch.device | str) -> "MemoryViews":
        return MemoryViews(self.tokens.to(device))

    def rows(self, views: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Tokens ``(U, D')`` float16 of the views ``views`` at positions ``flat`` = ``i * h * w + token`` (token
        ``token`` of view ``views[i]``), read straight from the pool."""
        hw = self.tokens.shape[1] * self.tokens.shape[2]
        views = views.to(self.tokens.device)
        return self.tokens.view(-1, self.tokens.shape[3])[views[flat // hw] * hw + flat % hw]


class FileViews:
    """Views read on demand from the cache files ``(5, D', h, w)`` float16 ``.npy`` (see module docstring)."""

    def __init__(self, paths: Sequence[Path], offsets: Sequence[int], dim: int, h: int, w: int,
                 max_open: int = 128):
        self.paths = [Path(p) for p in paths]
        self.offsets = list(offsets)  # byte offset of the array data in each file (after the .npy header)
        self.dim, self.h, self.w = dim, h, w
        self.view_bytes = dim * h * w * 2
        self._open: OrderedDict[int, int] = OrderedDict()  # image -> file descriptor, least recently used first
        self._max_open = max_open
        self._lock = threading.Lock()

    @property
    def num_views(self) -> int:
        return len(self.paths) * VIEWS_PER_IMAGE

    @property
    def geometry(self) -> tuple[int, int, int]:
        return self.dim, self.h, self.w

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _fd(self, image: int) -> int:
        with self._lock:
            fd = self._open.pop(image, None)
            if fd is None:
                fd = os.open(self.paths[image], os.O_RDONLY)
                while len(self._open) >= self._max_open:
                    os.close(self._open.popitem(last=False)[1])
            self._open[image] = fd
            return fd

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        out = np.empty((len(index), self.dim, self.h, self.w), dtype=np.float16)
        for row, view in enumerate(index.tolist()):
            image, part = divmod(view, VIEWS_PER_IMAGE)
            want = self.view_bytes
            data = os.pread(self._fd(image), want, self.offsets[image] + part * want)
            if len(data) != want:
                raise OSError(f"cached features {self.paths[image]} end early (truncated while training?)")
            out[row] = np.frombuffer(data, dtype=np.float16).reshape(self.dim, self.h, self.w)
        return torch.from_numpy(out).permute(0, 2, 3, 1).contiguous()

    def close(self) -> None:
        with self._lock:
            for fd in self._open.values():
                os.close(fd)
            self._open.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class ViewRows:
    """The tokens of some views (``views``, indices into ``store``), addressed by position ``i * h * w + token``:
    read straight from a memory store, or from ``maps`` (the views already read, ``(P, h, w, D')``; a streamed
    store reads them when none are given)."""

    def __init__(self, store, views: torch.Tensor, maps: torch.Tensor | None = None):
        self.store, self.views = store, views
        if maps is None and not isinstance(store, MemoryViews):
            maps = store.gather(views)
        self.maps = maps

    def __len__(self) -> int:
        return len(self.views)

    def index_device(self, device: torch.device | str) -> torch.device:
        """Where positions into these rows are best computed: where :meth:`take` reads them."""
        return self.store.device if self.maps is None else torch.device(device)

    def take(self, flat: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Tokens ``(U, D')`` float16 at positions ``flat``, on ``device``."""
        if self.maps is None:
            return self.store.rows(self.views, flat.to(self.store.device)).to(device, non_blocking=True)
        maps = self.maps.to(device, non_blocking=True)
        return maps.reshape(-1, maps.shape[-1])[flat.to(device)]


class TrainFeatures:
    """All training views of a set of images, five per image (``view_image_ids``), and each view's kNN
    ``(V, k)``. ``store``: a :class:`MemoryViews` / :class:`FileViews`, or a ``(V, D', h, w)`` tensor (kept in
    memory, channels last)."""

    def __init__(self, store, view_image_ids: list[str], knn: torch.Tensor):
        if isinstance(store, torch.Tensor):
            store = MemoryViews(store.permute(0, 2, 3, 1).contiguous())
        self.store = store
        self.view_image_ids = view_image_ids
        self.knn = knn

    @property
    def num_views(self) -> int:
        return self.store.num_views

    @property
    def num_images(self) -> int:
        return self.num_views // VIEWS_PER_IMAGE

    @property
    def geometry(self) -> tuple[int, int, int]:
        """``(D', h, w)`` of every view."""
        return self.store.geometry

    @property
    def streamed(self) -> bool:
        return isinstance(self.store, FileViews)

    @property
    def nbytes(self) -> int:
        dim, h, w = self.geometry
        return self.num_views * dim * h * w * 2

    def tokens(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Views ``index`` as float32 token maps ``(B, h, w, D')`` on ``device``."""
        return self.store.gather(index).to(device, non_blocking=True).float()

    def views(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Views ``index`` as float32 feature maps ``(B, D', h, w)`` (a view of the channels-last tokens)."""
        return self.tokens(index, device).permute(0, 3, 1, 2)

    def chunks(self, index: torch.Tensor, size: int, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """:meth:`views` of ``index`` in chunks of ``size`` (streamed stores read each chunk ahead)."""
        parts = list(index.split(size))
        for batch in Prefetcher(self.store, ([p] for p in parts), depth=2 if self.streamed else 0):
            yield batch[0].to(device, non_blocking=True).float().permute(0, 3, 1, 2)


class Prefetcher:
    """Gathers, for every item of ``plan`` (a list of index tensors), the views of each tensor; with ``depth`` > 0
    on a thread, ``depth`` items ahead of the consumer. Yields lists of float16 ``(B, h, w, D')`` tensors."""

    def __init__(self, store, plan: Iterable[list[torch.Tensor]], depth: int = 2):
        self.store, self.plan, self.depth = store, plan, depth

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        if self.depth <= 0:
            for item in self.plan:
                yield [self.store.gather(index) for index in item]
            return
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        done = object()

        def work():
            try:
                for item in self.plan:
                    if stop.is_set():
                        return
                    batch = [self.store.gather(index) for index in item]
                    if torch.cuda.is_available():
                        batch = [b.pin_memory() for b in batch]
                    ready.put(batch)
                ready.put(done)
            except BaseException as err:  # handed to the consumer, raised there
                ready.put(err)

        thread = threading.Thread(target=work, name="fuss-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a worker waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    thread.join(0.05)


# ------------------------------------------------------------------------------------------- nearest neighbours


def descriptors(views: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean-pooled features of views ``(B, D', h, w)`` -> ``(B, D')`` float32."""
    return F.normalize(views.float().mean(dim=(2, 3)), dim=1)


def _top_k(query: torch.Tensor, keys: torch.Tensor, k: int, self_offset: int | None) -> torch.Tensor:
    """Top-k columns of ``query @ keys.T`` per row, in row chunks; ``self_offset``: row i of query is key
    ``self_offset + i`` and is excluded."""
    out = torch.empty(len(query), k, dtype=torch.long)
    rows = max(1, KNN_CHUNK_BYTES // (4 * max(1, len(keys))))
    for start in range(0, len(query), rows):
        sim = query[start:start + rows] @ keys.T
        if self_offset is not None:
            index = torch.arange(sim.shape[0], device=sim.device)
            sim[index, index + self_offset + start] = -float("inf")
        out[start:start + rows] = sim.topk(k, dim=1).indices.cpu()
    return out


def knn_from_descriptors(desc: torch.Tensor, k: int, device: torch.device | str = "cpu",
                         exact_max_views: int = EXACT_KNN_MAX_VIEWS) -> torch.Tensor:
    """Each view's ``k`` nearest other views ``(V, k)`` by cosine of ``desc`` ``(V, D')`` (unit rows, five views
    per image), computed on ``device``: exact up to ``exact_max_views`` views, else in two stages (module
    docstring)."""
    from .datasets import DataError

    n = desc.shape[0]
    k = min(k, n - 1)
    if k < 1:
        raise DataError(f"kNN needs at least 2 views, got {n}")
    keys = desc.to(device, torch.float32)
    if n <= exact_max_views:
        return _top_k(keys, keys, k, self_offset=0)
    images = n // VIEWS_PER_IMAGE
    image_desc = F.normalize(keys[: images * VIEWS_PER_IMAGE].view(images, VIEWS_PER_IMAGE, -1).mean(1), dim=1)
    near = _top_k(image_desc, image_desc, min(CANDIDATE_IMAGES, images) - 1, self_offset=0)
    candidates = torch.cat([torch.arange(images)[:, None], near], dim=1)  # the image itself first
    views = (candidates[:, :, None] * VIEWS_PER_IMAGE + torch.arange(VIEWS_PER_IMAGE)).flatten(1)  # (I, 5M)
    out = torch.empty(n, k, dtype=torch.long)
    for image in range(images):
        cand = views[image].to(device)
        for part in range(VIEWS_PER_IMAGE):
            view = image * VIEWS_PER_IMAGE + part
            sim = keys[cand] @ keys[view]
            sim[part] = -float("inf")  # the view itself is candidate `part` of its own image
            out[view] = cand[sim.topk(k).indices].cpu()
    return out


def build_knn(feats: torch.Tensor, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Top-k neighbours of every view ``(V, D', h, w)`` by cosine of its mean-pooled features, excluding itself."""
    return knn_from_descriptors(descriptors(feats), k, device)


def knn_recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of the exact kNN lists' members that ``approx`` also lists."""
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist()))
    return hits / max(1, exact.numel())


def pool_bytes(num_views: int, dim: int, h: int, w: int) -> int:
    """Bytes of ``num_views`` float16 views."""
    return num_views * dim * h * w * 2


def step_views(batch_size: int, num_random: int) -> int:
    """Views one stego step reads: the queries, one kNN partner each, ``num_random`` random partners each."""
    return batch_size * (2 + num_random)


def memory_budget(configured_gb: float | None) -> int:
    """Bytes training may hold: ``train.memory_budget_gb``, or half of this machine's physical memory."""
    if configured_gb is not None:
        return int(configured_gb * (1 << 30))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_storage(mode: str, num_views: int, dim: int, h: int, w: int, batch_size: int, num_random: int,
                   budget: int, site: str = "") -> str:
    """``"memory"`` or ``"stream"`` for ``train.feature_storage`` = ``mode`` (``auto``: memory when the pool with
    its load-time peak, 1.2 x the pool, fits the budget). ValueError when the budget cannot hold the batches a
    streamed step reads ahead (three steps' views, float16 and float32), naming the numbers."""
    pool = pool_bytes(num_views, dim, h, w)
    step = pool_bytes(step_views(batch_size, num_random), dim, h, w) * 3 * 3  # 3 steps, float16 + float32 copies
    who = f"site {site!r}: " if site else ""
    if step > budget:
        raise ValueError(f"{who}train.memory_budget_gb={budget / (1 << 30):.3g} cannot hold the batches of one "
                         f"training step ({step / (1 << 30):.3g} GB for {step_views(batch_size, num_random)} views "
                         f"of {dim} x {h} x {w}); raise it or lower train.batch_size / train.num_random")
    if mode == "auto":
        return "memory" if 1.2 * pool + step <= budget else "stream"
    return mode

