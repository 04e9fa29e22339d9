"""Client partitions: which image ids each training site holds, and which are held out for validation.

Strategies (``shared/docs/fuss-spec.md`` section 3):

* ``site``: one client per natural site (video sequence, hospital, city) or per group of sites;
* ``dirichlet`` (paper Appendix D): every image gets its dominant class (most frequent labelled pixel); for each
  class a draw p ~ Dir(alpha * 1_K) over the K clients splits that class's images;
* ``iid``: a random equal split.

A :class:`Partition` is saved as the JSON manifest described in ``docs/architecture.md``::

    {"dataset": str, "strategy": "site"|"dirichlet"|"iid", "seed": int, "num_classes": int,
     "clients": {site: [image ids]}, "validation": {site: [image ids]}, "meta": {...}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .datasets import DataError, SegmentationDataset
from .files import atomic_write_json

__all__ = [
    "Partition",
    "dominant_class",
    "partition_by_site",
    "partition_dirichlet",
    "partition_iid",
    "preset_partition",
    "PRESETS",
    "PartitionPreset",
    "STRATEGIES",
]

STRATEGIES = ("site", "dirichlet", "iid")
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


def _client_names(n: int) -> list[str]:
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


def dominant_classes(ds: SegmentationDataset, ids: Sequence[str], progress: bool = True) -> dict[str, int]:
    """Dominant class of each image (reads every label once, with a progress bar)."""
    ds.require_labels("a Dirichlet partition (by each image's dominant class)")
    return {i: dominant_class(ds.load_label(i), ds.ignore_index)
            for i in tqdm(ids, desc=f"{ds.name}: dominant classes", unit="img", disable=not progress,
                          leave=False)}


def partition_dirichlet(ds: SegmentationDataset, ids: Sequence[str] | None, num_clients: int, alpha: float,
                        seed: int, *, dominant: dict[str, int] | None = None, max_tries: int = 100,
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
    by_class: dict[int, list[str]] = {}
    for i in ids:
        by_class.setdefault(int(dominant[i]), []).append(i)
    classes = sorted(by_class)
    names = _client_names(num_clients)
    for attempt in range(max_tries):
        rng = np.random.default_rng([int(seed), attempt])
        assigned: list[list[str]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = by_class[c]
            order = rng.permutation(len(members))
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            counts = _apportion(p, len(members))
            for k, chunk in enumerate(np.split(order, np.cumsum(counts)[:-1])):
                assigned[k].extend(members[j] for j in chunk)
        if all(assigned):
            break
    else:
        empty = names[[len(a) for a in assigned].index(0)]
        raise DataError(f"Dirichlet(alpha={alpha}) split of {len(ids)} images of {ds.name!r} into {num_clients} "
                        f"clients left client {empty!r} empty in all {max_tries} attempts; use a larger alpha "
                        f"or fewer clients")
    rank = {i: n for n, i in enumerate(ids)}
    clients = {name: sorted(a, key=rank.__getitem__) for name, a in zip(names, assigned)}
    hist = {name: _class_hist([dominant[i] for i in a], ds.num_classes) for name, a in clients.items()}
    meta = {"alpha": float(alpha), "attempt": attempt, "dominant_class_counts": hist,
            "no_label_images": len(by_class.get(-1, []))}
    return Partition(dataset=ds.name, strategy="dirichlet", seed=int(seed), num_classes=ds.num_classes,
                     clients=clients, validation=dict(validation or {}), meta=meta)


def _apportion(p: np.ndarray, n: int) -> np.ndarray:
    """Integer counts summing to n proportional to p (largest remainders; ties to the lower index).

    Unlike cutting at floor(cumsum(p) * n), this does not favour the last client when a class has few images."""
    exact = np.asarray(p, float) * n
    counts = np.floor(exact).astype(np.int64)
    short = n - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def _class_hist(tags: Iterable[int], num_classes: int) -> list[int]:
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
               for name, part in zip(_client_names(num_clients), np.array_split(order, num_clients))}
    return Partition(dataset=ds.name, strategy="iid", seed=int(seed), num_classes=ds.num_classes,
                     clients=clients, validation=dict(validation or {}), meta={})


# ====================================================================== presets
def _require_sites(ds: SegmentationDataset, sites: Iterable[str], preset: str) -> None:
    known = set(ds.sites())
    for s in sites:
        if s not in known:
            raise DataError(f"preset {preset!r}: site {s!r} not in dataset {ds.name!r} (sites: {sorted(known)})")


def _fixed_clients(preset: str, num_clients: int, n: int) -> None:
    if num_clients != n:
        raise DataError(f"preset {preset!r} has {n} clients (one per site), not {num_clients}")


CAMVID_TRAINING_SITES, CAMVID_HELD_OUT = ("0001TP", "0006R0", "0016E5"), "Seq05VD"
POLYP_SITES = ("kvasir", "cvc_clinicdb")


def _preset_camvid(ds: SegmentationDataset, seed: int, num_clients: int) -> Partition:
    train, held_out = list(CAMVID_TRAINING_SITES), CAMVID_HELD_OUT
    _fixed_clients("camvid", num_clients, len(train))
    _require_sites(ds, train + [held_out], "camvid")
    return partition_by_site(ds, train, [held_out], seed=seed, meta={"preset": "camvid"})


def _preset_polyp(ds: SegmentationDataset, seed: int, num_clients: int) -> Partition:
    sites = list(POLYP_SITES)
    _fixed_clients("polyp", num_clients, len(sites))
    _require_sites(ds, sites, "polyp")
    return partition_by_site(ds, sites, sites, splits=["train"], validation_splits=["test"], seed=seed,
                             meta={"preset": "polyp"})


def _preset_cityscapes(ds: SegmentationDataset, seed: int, num_clients: int) -> Partition:
    k = int(num_clients)
    cities = sorted({s.site for s in ds.samples(split="train")})
    if not cities:
        raise DataError(f"preset 'cityscapes': dataset {ds.name!r} has no images in split 'train'")
    if not 1 <= k <= len(cities):
        raise DataError(f"preset 'cityscapes': num_clients must be in 1..{len(cities)} (the training cities), "
                        f"got {k}")
    groups = {name: [str(c) for c in part]
              for name, part in zip(_client_names(k), np.array_split(np.array(cities, dtype=object), k))}
    val_ids = ds.ids(split="val")
    if not val_ids:
        raise DataError(f"preset 'cityscapes': dataset {ds.name!r} has no images in split 'val'")
    part = partition_by_site(ds, groups=groups, splits=["train"], seed=seed,
                             meta={"preset": "cityscapes",
                                   "validation_sites": {"val": sorted({s.site for s in ds.samples(split="val")})}})
    part.validation = {"val": val_ids}
    return part


def _preset_cocostuff27(ds: SegmentationDataset, seed: int, num_clients: int) -> Partition:
    train_ids, val_ids = ds.ids(split="train2017"), ds.ids(split="val2017")
    if not train_ids or not val_ids:
        raise DataError(f"preset 'cocostuff27': dataset {ds.name!r} needs images in splits train2017 and val2017")
    part = partition_dirichlet(ds, train_ids, int(num_clients), 0.5, seed, validation={"val": val_ids})
    part.meta["preset"] = "cocostuff27"
    return part


@dataclass(frozen=True)
class PartitionPreset:
    """A paper-like partition of a known dataset, with what a job needs to know of it without reading the data."""

    dataset: str  # the dataset it partitions (config ``data.dataset``)
    num_clusters: int  # |C|: the dataset's number of classes, explicit so that a server never needs the data
    clients: int  # training sites when no count is asked for
    validation_only: int  # validation sites that are not training sites (simulator -n = training sites + this)
    description: str
    build: Callable[[SegmentationDataset, int, int], Partition]  # (dataset, seed, number of clients)
    client_choices: tuple[int, ...] = ()  # the client counts jobs offer (the paper's); empty: only ``clients``

    def num_sites(self, clients: int | None = None) -> int:
        """Training plus validation-only sites (the simulator's ``-n``) with ``clients`` training sites."""
        return (self.clients if clients is None else clients) + self.validation_only


# The one table of dataset / partition presets: the partition code, the jobs and the benchmarks read it.
PRESETS = {
    "camvid": PartitionPreset(
        "camvid", 11, 3, 1, "CamVid by sequence: clients 0001TP, 0006R0, 0016E5; Seq05VD held out for validation",
        _preset_camvid),
    "polyp": PartitionPreset(
        "polyp", 2, 2, 0, "kvasir and cvc_clinicdb hospitals; each validates on its PraNet test list",
        _preset_polyp),
    "cityscapes": PartitionPreset(
        "cityscapes", 27, 3, 1,
        "Cityscapes by city (18 training cities in 3, 6 or 18 clients); the 3 val cities validate",
        _preset_cityscapes, (3, 6, 18)),
    "cocostuff27": PartitionPreset(
        "cocostuff27", 27, 18, 1, "COCO-Stuff-27, Dirichlet(0.5) over 18 clients; val2017 (curated) validates",
        _preset_cocostuff27, tuple(range(1, 101))),
}


def preset_partition(name: str, ds: SegmentationDataset, seed: int = 0,
                     num_clients: int | None = None) -> Partition:
    """The paper-like partition of a known dataset (:data:`PRESETS`).

    * ``camvid``: clients 0001TP, 0006R0, 0016E5 (all their images); validation ``{"Seq05VD": all its images}``.
    * ``polyp``: clients kvasir and cvc_clinicdb with their ``train`` images; validation the same two sites with
      their ``test`` images (the PraNet lists).
    * ``cityscapes``: the training cities in sorted order, grouped into ``num_clients`` (default 3; 6 or 18 as in
      the paper) consecutive groups "client1".."clientN" (``meta["client_sites"]`` lists their cities);
      validation ``{"val": every image of split val}``.
    * ``cocostuff27``: Dirichlet(alpha=0.5) split of the train2017 (curated) images into ``num_clients``
      (default 18) clients "client1"..; validation ``{"val": the val2017 (curated) images}``.

    ``num_clients`` None: the preset's ``clients``. Raises ``DataError`` for an unknown preset, a missing site,
    or an impossible number of clients.
    """
    try:
        preset = PRESETS[name]
    except KeyError:
        raise DataError(f"unknown partition preset {name!r}; known: {sorted(PRESETS)}") from None
    return preset.build(ds, int(seed), preset.clients if num_clients is None else int(num_clients))


def preset_site_names(name: str, num_clients: int | None = None) -> tuple[list[str], list[str]]:
    """(training sites, validation-only sites) of a preset's partition, known without reading the data."""
    preset = PRESETS[name]
    k = preset.clients if num_clients is None else int(num_clients)
    if name == "camvid":
        return list(CAMVID_TRAINING_SITES), [CAMVID_HELD_OUT]
    if name == "polyp":
        return list(POLYP_SITES), []
    return _client_names(k), ["val"]
