"""Client partitions: which image ids each training site holds, and which are held out for validation.

Strategies (``shared/docs/fuss-spec.md`` section 3):

* ``site``: one client per natural site (video sequence, hospital, city) or per group of sites;
* ``dirichlet`` (paper Appendix D): every image gets its dominant class (most frequent labelled pixel); for each
  class a draw p ~ Dir(alpha * 1_K) over the K clients splits that class's images;
* ``iid``: a random equal split;
* ``missing``: every image gets its dominant class and each client holds images of only about half of the
  classes, so it lacks the others entirely (:func:`partition_missing_classes`).

A :class:`Partition` is saved as the JSON manifest described in ``docs/architecture.md``::

    {"dataset": str, "strategy": "site"|"dirichlet"|"iid"|"missing", "seed": int, "num_classes": int,
     "clients": {site: [image ids]}, "validation": {site: [image ids]}, "meta": {...}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .datasets import DataError, SegmentationDataset
from .files import atomic_write_json

__all__ = [
    "Partition",
    "dominant_class",
    "dominant_classes",
    "label_class_pixels",
    "partition_by_site",
    "partition_dirichlet",
    "partition_iid",
    "partition_missing_classes",
    "polyp_size_bins",
    "preset_partition",
    "preset_site_names",
    "PRESETS",
    "PartitionPreset",
    "STRATEGIES",
]

STRATEGIES = ("site", "dirichlet", "iid", "missing")
DIRICHLET_MAX_TRIES = 100  # redraws of a Dirichlet split that left a client empty
_KEYS = ("dataset", "strategy", "seed", "num_classes", "clients", "validation", "meta")


@dataclass
class Partition:
    """Client -> image ids for training, site -> image ids for validation, plus how they were made."""

    dataset: str
    strategy: str
    seed: int
    num_classes: int
    clients: dict[str, list[str]]
    validation: dict[str, list[str]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    def sites(self) -> list[str]:
        """Training sites (the keys of ``clients``) in manifest order."""
        return list(self.clients)

    def validation_sites(self) -> list[str]:
        """Validation sites (the keys of ``validation``); they may also be training sites."""
        return list(self.validation)

    def sizes(self) -> dict[str, int]:
        """Number of training images per client."""
        return {k: len(v) for k, v in self.clients.items()}

    def to_dict(self) -> dict:
        """The manifest as a JSON-ready dict (keys in the documented order)."""
        return {
            "dataset": self.dataset,
            "strategy": self.strategy,
            "seed": int(self.seed),
            "num_classes": int(self.num_classes),
            "clients": {str(k): [str(i) for i in v] for k, v in self.clients.items()},
            "validation": {str(k): [str(i) for i in v] for k, v in self.validation.items()},
            "meta": _jsonable(self.meta),
        }

    # ------------------------------------------------------------------ checks
    def validate(self, dataset: SegmentationDataset) -> None:
        """Check the partition against a dataset.

        Raises ``DataError`` naming the client (or validation site) when it is empty or lists image ids the
        dataset does not have, when an id appears twice in one client, or when the number of classes differs.
        """
        if self.num_classes != dataset.num_classes:
            raise DataError(f"partition of {self.dataset!r} has {self.num_classes} classes but dataset "
                            f"{dataset.name!r} has {dataset.num_classes}")
        if not self.clients:
            raise DataError(f"partition of {self.dataset!r} has no clients")
        for kind, table in (("client", self.clients), ("validation site", self.validation)):
            for site, ids in table.items():
                if not ids:
                    raise DataError(f"{kind} {site!r} has no images")
                unknown = [i for i in ids if i not in dataset]
                if unknown:
                    raise DataError(f"{kind} {site!r}: {len(unknown)} image id(s) not in dataset "
                                    f"{dataset.name!r}, e.g. {unknown[:5]}")
                if len(set(ids)) != len(ids):
                    dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
                    raise DataError(f"{kind} {site!r} lists image ids more than once, e.g. {dup}")

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | Path) -> Path:
        """Write the JSON manifest atomically (temporary file + rename); returns the path."""
        return atomic_write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        """Read a JSON manifest; ``DataError`` naming the file when it is missing or malformed."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"partition manifest not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read partition manifest {path}: {exc}") from None
        try:
            return cls.from_dict(data)
        except DataError as exc:
            raise DataError(f"malformed partition manifest {path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: object) -> Partition:
        """Build from a manifest dict, checking keys and types (``DataError`` naming the bad key)."""
        if not isinstance(data, dict):
            raise DataError("expected a JSON object")
        missing = [k for k in _KEYS if k not in data and k not in ("validation", "meta")]
        if missing:
            raise DataError(f"missing key(s) {missing}")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise DataError(f"unknown key(s) {unknown}")
        if not isinstance(data["dataset"], str):
            raise DataError("'dataset' must be a string")
        if data["strategy"] not in STRATEGIES:
            raise DataError(f"'strategy' must be one of {list(STRATEGIES)}, got {data['strategy']!r}")
        for k in ("seed", "num_classes"):
            if not isinstance(data[k], int) or isinstance(data[k], bool):
                raise DataError(f"{k!r} must be an integer")
        tables = {}
        for k in ("clients", "validation"):
            table = data.get(k, {})
            if not isinstance(table, dict) or not all(
                    isinstance(v, list) and all(isinstance(i, str) for i in v) for v in table.values()):
                raise DataError(f"{k!r} must map site names to lists of image ids (strings)")
            tables[k] = {str(s): list(v) for s, v in table.items()}
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise DataError("'meta' must be an object")
        return cls(dataset=data["dataset"], strategy=data["strategy"], seed=data["seed"],
                   num_classes=data["num_classes"], clients=tables["clients"], validation=tables["validation"],
                   meta=meta)


def _jsonable(obj):
    """Plain-JSON copy of meta values (numpy scalars/arrays, tuples, Paths)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ====================================================================== helpers
def dominant_class(label: np.ndarray, ignore_index: int = 255) -> int:
    """Most frequent class id among the non-ignore pixels of a label (ties: the smallest id); -1 if none."""
    counts = np.bincount(np.asarray(label, dtype=np.uint8).ravel(), minlength=256)
    if 0 <= ignore_index < counts.size:
        counts[ignore_index] = 0
    if counts.sum() == 0:
        return -1
    return int(counts.argmax())


def numbered_client_names(n: int) -> list[str]:
    return [f"client{i + 1}" for i in range(n)]


def _check_ids(ds: SegmentationDataset, ids: Sequence[str] | None) -> list[str]:
    ids = ds.ids() if ids is None else [str(i) for i in ids]
    unknown = [i for i in ids if i not in ds]
    if unknown:
        raise DataError(f"{len(unknown)} image id(s) not in dataset {ds.name!r}, e.g. {unknown[:5]}")
    if len(set(ids)) != len(ids):
        raise DataError(f"image ids given more than once for dataset {ds.name!r}")
    return ids


def _check_num_clients(num_clients: int, n_ids: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n_ids:
        raise DataError(f"cannot split {n_ids} images into {num_clients} non-empty clients")


# ====================================================================== strategies
def partition_by_site(ds: SegmentationDataset, sites: Iterable[str] | None = None,
                      validation_sites: Iterable[str] = (), *, splits: Iterable[str] | None = None,
                      validation_splits: Iterable[str] | None = None,
                      groups: dict[str, Sequence[str]] | None = None, seed: int = 0,
                      meta: dict | None = None) -> Partition:
    """One client per natural site (or per group of sites).

    Args:
        ds: the dataset.
        sites: training sites, each its own client (default: every site not in ``validation_sites``).
        validation_sites: sites held out for validation (a site may be in both lists).
        splits: if given, a client holds only its images of these splits (e.g. ``["train"]``).
        validation_splits: likewise for the validation sites.
        groups: instead of ``sites``, client name -> the sites it holds (e.g. several cities per client).
        seed: recorded in the manifest (the split itself is deterministic).
        meta: extra fields for the manifest's ``meta``.

    Raises ``DataError`` naming a site the dataset does not have, or a client/validation site left empty.
    """
    known = set(ds.sites())
    validation_sites = list(validation_sites)
    if groups is not None:
        if sites is not None:
            raise DataError("give either sites or groups, not both")
        groups = {str(k): list(v) for k, v in groups.items()}
    else:
        sites = [s for s in ds.sites() if s not in validation_sites] if sites is None else list(sites)
        groups = {s: [s] for s in sites}
    for s in [s for g in groups.values() for s in g] + validation_sites:
        if s not in known:
            raise DataError(f"site {s!r} not in dataset {ds.name!r} (sites: {sorted(known)})")
    splits = None if splits is None else set(splits)
    validation_splits = None if validation_splits is None else set(validation_splits)

    def pick(site_list: Sequence[str], allowed: set[str] | None) -> list[str]:
        wanted = set(site_list)
        return [s.id for s in ds.samples() if s.site in wanted and (allowed is None or s.split in allowed)]

    clients = {name: pick(members, splits) for name, members in groups.items()}
    validation = {s: pick([s], validation_splits) for s in validation_sites}
    for kind, table, allowed in (("client", clients, splits), ("validation site", validation, validation_splits)):
        for name, ids in table.items():
            if not ids:
                where = f" in splits {sorted(allowed)}" if allowed else ""
                raise DataError(f"{kind} {name!r} of dataset {ds.name!r} has no images{where}")
    info = {"client_sites": groups,
            "splits": sorted(splits) if splits else None,
            "validation_splits": sorted(validation_splits) if validation_splits else None}
    info.update(meta or {})
    return Partition(dataset=ds.name, strategy="site", seed=int(seed), num_classes=ds.num_classes,
                     clients=clients, validation=validation, meta=info)


# Class pixel counts per label file, keyed by (dataset type, path, size, mtime): a site process resolves its
# partition more than once (the site, the result filter's bounds), and label-skewed presets read every label.
_CLASS_PIXELS: dict[tuple, np.ndarray] = {}


def label_class_pixels(ds: SegmentationDataset, ids: Sequence[str], progress: bool = True,
                       purpose: str = "a label-skewed partition") -> dict[str, np.ndarray]:
    """Pixel count of each class ``0..K-1`` in each image's label (ignore pixels not counted), as int64 arrays.

    Reads every label once per process (with a progress bar); later calls for an unchanged label file reuse the
    counts. ``purpose`` names what needs the labels in the error of a dataset without labels."""
    ds.require_labels(purpose)
    out, todo = {}, []
    for i in ids:
        path = ds.sample(i).label_path
        if path is None or not path.is_file():  # load_label names the problem
            todo.append((i, None))
            continue
        stat = path.stat()
        key = (type(ds).__qualname__, str(path), stat.st_size, stat.st_mtime_ns)
        if key in _CLASS_PIXELS:
            out[i] = _CLASS_PIXELS[key]
        else:
            todo.append((i, key))
    for i, key in tqdm(todo, desc=f"{ds.name}: class pixels", unit="img", disable=not progress or not todo,
                       leave=False):
        counts = np.bincount(ds.load_label(i).ravel(), minlength=256)
        if 0 <= ds.ignore_index < counts.size:
            counts[ds.ignore_index] = 0
        out[i] = counts[:ds.num_classes].astype(np.int64)
        out[i].flags.writeable = False  # shared with later calls
        if key is not None:
            _CLASS_PIXELS[key] = out[i]
    return {i: out[i] for i in ids}


def dominant_classes(ds: SegmentationDataset, ids: Sequence[str], progress: bool = True) -> dict[str, int]:
    """Dominant class of each image (as :func:`dominant_class`; the labels are read by :func:`label_class_pixels`)."""
    pixels = label_class_pixels(ds, ids, progress, purpose="a partition by each image's dominant class")
    return {i: int(c.argmax()) if c.sum() else -1 for i, c in pixels.items()}


def partition_dirichlet(ds: SegmentationDataset, ids: Sequence[str] | None, num_clients: int, alpha: float,
                        seed: int, *, dominant: dict[str, int] | None = None,
                        max_tries: int = DIRICHLET_MAX_TRIES,
                        validation: dict[str, list[str]] | None = None, progress: bool = True) -> Partition:
    """Non-IID split by dominant class (paper Appendix D).

    Each image is tagged with its dominant class (most frequent non-ignore label pixel; images without any
    labelled pixel form their own group, tag -1). For each class, in increasing class order, the class's images
    are shuffled and p ~ Dir(alpha * 1_K) is drawn over the K clients; client k gets a share of n_c * p_k of the
    class's n_c images (rounded by largest remainders, so small classes do not all land on the last client).
    Everything comes from ``numpy.random.default_rng([seed, attempt])``, so the result depends only on the seed
    and the ids (in their given order). If a client ends up empty the draw is repeated with the next attempt
    number, at most ``max_tries`` times, then ``DataError`` naming the empty client.

    Args:
        ds: the dataset (labels are read unless ``dominant`` is given).
        ids: the image ids to split (default: all images of ``ds``).
        num_clients: K, number of clients ("client1".."clientK").
        alpha: Dirichlet concentration (small = skewed, large = close to IID).
        seed: random seed.
        dominant: precomputed id -> dominant class (skips reading labels).
        max_tries: bound on the empty-client retries.
        validation: validation table to put into the partition.
        progress: show a tqdm bar while reading labels.
    """
    ids = _check_ids(ds, ids)
    _check_num_clients(num_clients, len(ids))
    if not (alpha > 0 and math.isfinite(alpha)):
        raise DataError(f"alpha must be a positive number, got {alpha!r}")
    if dominant is None:
        dominant = dominant_classes(ds, ids, progress=progress)
    if max_tries < 1:
        raise DataError(f"max_tries must be at least 1, got {max_tries}")
    missing = [i for i in ids if i not in dominant]
    if missing:
        raise DataError(f"no dominant class given for image ids {missing[:5]}")
    by_class = group_by_tag(ids, dominant)
    names = numbered_client_names(num_clients)
    assigned, attempt = dirichlet_split(by_class, names, alpha, (int(seed),), max_tries,
                                         f"{len(ids)} images of {ds.name!r}")
    rank = {i: n for n, i in enumerate(ids)}
    clients = {name: sorted(a, key=rank.__getitem__) for name, a in zip(names, assigned)}
    hist = {name: class_histogram([dominant[i] for i in a], ds.num_classes) for name, a in clients.items()}
    meta = {"alpha": float(alpha), "attempt": attempt, "dominant_class_counts": hist,
            "no_label_images": len(by_class.get(-1, []))}
    return Partition(dataset=ds.name, strategy="dirichlet", seed=int(seed), num_classes=ds.num_classes,
                     clients=clients, validation=dict(validation or {}), meta=meta)


def group_by_tag(ids: Sequence[str], tags: dict[str, int]) -> dict[int, list[str]]:
    """Tag -> its ids, in the order of ``ids``."""
    groups: dict[int, list[str]] = {}
    for i in ids:
        groups.setdefault(int(tags[i]), []).append(i)
    return groups


def dirichlet_split(by_tag: dict[int, list[str]], names: Sequence[str], alpha: float, seed_key: tuple[int, ...],
                     max_tries: int, what: str) -> tuple[list[list[str]], int]:
    """The draws of :func:`partition_dirichlet`: (ids per client, the attempt that left no client empty).

    ``seed_key``: the leading entries of every attempt's ``default_rng`` seed; ``what`` names the images in the
    error."""
    num_clients = len(names)
    for attempt in range(max_tries):
        rng = np.random.default_rng([*seed_key, attempt])
        assigned: list[list[str]] = [[] for _ in range(num_clients)]
        for tag in sorted(by_tag):
            members = by_tag[tag]
            order = rng.permutation(len(members))
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            counts = _apportion(p, len(members))
            for k, chunk in enumerate(np.split(order, np.cumsum(counts)[:-1])):
                assigned[k].extend(members[j] for j in chunk)
        if all(assigned):
            return assigned, attempt
    empty = names[[len(a) for a in assigned].index(0)]
    raise DataError(f"Dirichlet(alpha={alpha}) split of {what} into {num_clients} clients left client {empty!r} "
                    f"empty in all {max_tries} attempts; use a larger alpha or fewer clients")


def _apportion(p: np.ndarray, n: int) -> np.ndarray:
    """Integer counts summing to n proportional to p (largest remainders; ties to the lower index).

    Unlike cutting at floor(cumsum(p) * n), this does not favour the last client when a class has few images."""
    exact = np.asarray(p, float) * n
    counts = np.floor(exact).astype(np.int64)
    short = n - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def class_histogram(tags: Iterable[int], num_classes: int) -> list[int]:
    """Counts of dominant classes 0..K-1 (images tagged -1 are not counted)."""
    counts = np.zeros(num_classes, np.int64)
    for t in tags:
        if 0 <= t < num_classes:
            counts[t] += 1
    return counts.tolist()


def partition_iid(ds: SegmentationDataset, ids: Sequence[str] | None, num_clients: int, seed: int, *,
                  validation: dict[str, list[str]] | None = None) -> Partition:
    """Random equal split: the ids are shuffled with ``numpy.random.default_rng(seed)`` and cut into
    ``num_clients`` parts whose sizes differ by at most one ("client1".."clientK")."""
    ids = _check_ids(ds, ids)
    _check_num_clients(num_clients, len(ids))
    rng = np.random.default_rng(int(seed))
    order = rng.permutation(len(ids))
    rank = {i: n for n, i in enumerate(ids)}
    clients = {name: sorted((ids[j] for j in part), key=rank.__getitem__)
               for name, part in zip(numbered_client_names(num_clients), np.array_split(order, num_clients))}
    return Partition(dataset=ds.name, strategy="iid", seed=int(seed), num_classes=ds.num_classes,
                     clients=clients, validation=dict(validation or {}), meta={})


def partition_missing_classes(ds: SegmentationDataset, ids: Sequence[str] | None, num_clients: int, seed: int, *,
                              dominant: dict[str, int] | None = None,
                              validation: dict[str, list[str]] | None = None, progress: bool = True) -> Partition:
    """Split in which every client lacks some classes entirely: each client sees about half of the classes.

    Each image is tagged with its dominant class as in :func:`partition_dirichlet`. Let P be the classes that are
    the dominant class of at least one image (P >= 2) and m = ceil(P / 2). The P classes are put in a random
    order and client k (k = 0..K-1) sees the m consecutive ones, cyclically, from position floor(k P / K): every
    class is seen by at least one client, and every client holds no image whose dominant class is one of the
    other P - m. Each class's images are shuffled and dealt in near-equal parts to the clients that see it (which
    of them get the larger parts is random); images without any labelled pixel are dealt over all clients.

    "Lacks" is about the dominant class: a client still holds pixels of a lacked class where they are not an
    image's majority (every CamVid frame shows sky, building and road). Everything comes from
    ``numpy.random.default_rng(seed)``, so the result depends only on the seed and the ids (in their given order).
    ``DataError`` when K < 2, when P < 2, or naming a client left empty (its classes have fewer images than
    clients that see them). ``meta["classes_seen"]``: client -> its m classes.
    """
    ids = _check_ids(ds, ids)
    _check_num_clients(num_clients, len(ids))
    if dominant is None:
        dominant = dominant_classes(ds, ids, progress=progress)
    missing = [i for i in ids if i not in dominant]
    if missing:
        raise DataError(f"no dominant class given for image ids {missing[:5]}")
    by_class = group_by_tag(ids, dominant)
    names = numbered_client_names(num_clients)
    assigned, seen = missing_split(by_class, names, (int(seed),), f"{len(ids)} images of {ds.name!r}")
    rank = {i: n for n, i in enumerate(ids)}
    clients = {name: sorted(a, key=rank.__getitem__) for name, a in zip(names, assigned)}
    meta = {"classes_seen": dict(zip(names, seen)),
            "dominant_class_counts": {name: class_histogram([dominant[i] for i in a], ds.num_classes)
                                      for name, a in clients.items()},
            "no_label_images": len(by_class.get(-1, []))}
    return Partition(dataset=ds.name, strategy="missing", seed=int(seed), num_classes=ds.num_classes,
                     clients=clients, validation=dict(validation or {}), meta=meta)


def missing_split(by_tag: dict[int, list[str]], names: Sequence[str], seed_key: tuple[int, ...],
                   what: str) -> tuple[list[list[str]], list[list[int]]]:
    """The draws of :func:`partition_missing_classes` over any tags (tag -1: no tag, dealt over all clients):
    (ids per client, tags each client sees). ``what`` names the images in the errors."""
    num_clients, tags = len(names), sorted(t for t in by_tag if t >= 0)
    if num_clients < 2:
        raise DataError(f"a split with missing classes needs at least 2 clients, got {num_clients} for {what}")
    if len(tags) < 2:
        raise DataError(f"a split with missing classes needs images of at least 2 classes; {what} have {tags}")
    rng = np.random.default_rng(list(seed_key))
    order = [tags[j] for j in rng.permutation(len(tags))]
    total, seen_per_client = len(tags), -(-len(tags) // 2)
    seen = [sorted(order[(k * total // num_clients + j) % total] for j in range(seen_per_client))
            for k in range(num_clients)]
    assigned: list[list[str]] = [[] for _ in names]
    for tag in sorted(by_tag):
        holders = [k for k in range(num_clients) if tag < 0 or tag in seen[k]]
        members = by_tag[tag]
        shuffled = [members[j] for j in rng.permutation(len(members))]
        for k, part in zip(rng.permutation(holders), np.array_split(np.arange(len(members)), len(holders))):
            assigned[k].extend(shuffled[j] for j in part)
    if not all(assigned):
        k = [len(a) for a in assigned].index(0)
        raise DataError(f"split of {what} with missing classes into {num_clients} clients left client {names[k]!r} "
                        f"(classes {seen[k]}) empty; use fewer clients")
    return assigned, seen


# ====================================================================== the site strategy of `fuss partition`
AUTO_VALIDATION_SPLIT = "test"  # without held-out options, sites whose images are all in this split only validate


def partition_sites(ds: SegmentationDataset, validation_sites: Iterable[str] = (),
                    validation_split: str | None = None, seed: int = 0) -> Partition:
    """One client per site of the dataset (``fuss partition --strategy site``, config ``partition="site"``).

    Held-out validation:

    * ``validation_sites``: these sites only validate, on all their images;
    * ``validation_split``: every other site's images of this split are held out: the site trains on its other
      images and validates on these (a site with images of this split only, only validates);
    * neither: sites whose images are all in split ``test`` only validate; the others train on all their images.

    Raises ``DataError`` naming an unknown site or split, or a dataset without labels when a site validates. A
    partition without a training site is valid here: a site's own folder may hold validation images only (a run
    needs a training site somewhere: ``FussConfig.check_sites``).
    """
    sites, splits = ds.sites(), ds.splits()
    validation_sites = list(validation_sites)
    for site in validation_sites:
        if site not in sites:
            raise DataError(f"validation site {site!r} is not a site of dataset {ds.name!r} (sites: {sites})")
    if validation_split is not None and validation_split not in splits:
        raise DataError(f"validation split {validation_split!r} is not a split of dataset {ds.name!r} "
                        f"(splits: {splits})")
    if not validation_sites and validation_split is None:
        validation_sites = [s for s in sites
                            if {x.split for x in ds.samples(site=s)} == {AUTO_VALIDATION_SPLIT}]
    clients, validation = {}, {}
    for site in sites:
        samples = ds.samples(site=site)
        held_out = [x.id for x in samples if site in validation_sites or x.split == validation_split]
        training = [x.id for x in samples if site not in validation_sites and x.split != validation_split]
        if training:
            clients[site] = training
        if held_out:
            validation[site] = held_out
    if validation:
        ds.require_labels(f"validation sites {list(validation)}")
    meta = {"validation_only": [s for s in validation if s not in clients], "validation_split": validation_split}
    return Partition(dataset=ds.name, strategy="site", seed=int(seed), num_classes=ds.num_classes,
                     clients=clients, validation=validation, meta=meta)


def partition_summary(partition: Partition) -> str:
    """What ``fuss partition`` prints: a headline, then every training site and every validation site with its
    number of images."""
    train_images = sum(len(ids) for ids in partition.clients.values())
    val_images = sum(len(ids) for ids in partition.validation.values())
    lines = [f"partition of dataset {partition.dataset!r} ({partition.strategy}): {len(partition.clients)} training "
             f"site(s) with {train_images} images, {len(partition.validation)} validation site(s) with "
             f"{val_images} images"]
    tables = [*partition.clients.items(), *partition.validation.items()]
    width = max((len(site) for site, _ in tables), default=0)
    digits = max((len(str(len(ids))) for _, ids in tables), default=0)
    for site, ids in partition.clients.items():
        lines.append(f"  train     {site:<{width}}  {len(ids):>{digits}} images")
    for site, ids in partition.validation.items():
        only = "" if site in partition.clients else "  (validation only)"
        lines.append(f"  validate  {site:<{width}}  {len(ids):>{digits}} images{only}")
    return "\n".join(lines)
