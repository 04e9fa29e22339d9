"""Partition presets: the paper-like partitions of the known datasets (:data:`PRESETS`), what a job needs to know
of each without reading the data (site names, |C|, client counts), and the grammar of the config key
``partition`` (:func:`parse_partition_spec`: a manifest file, ``site``, or ``PRESET[:N]``). The strategies they
use are in :mod:`fuss_components.partition`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .config import FussConfig
from .datasets import DataError, SegmentationDataset
from .partition import (
    DIRICHLET_MAX_TRIES,
    Partition,
    class_histogram,
    dirichlet_split,
    group_by_tag,
    label_class_pixels,
    missing_split,
    numbered_client_names,
    partition_by_site,
    partition_dirichlet,
    partition_missing_classes,
)


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


def _preset_camvid_skewed(ds: SegmentationDataset, seed: int, num_clients: int, *, preset: str,
                          alpha: float | None) -> Partition:
    """CamVid's training frames (every frame of the three training sequences, as preset ``camvid``) split into
    ``client1..K`` by dominant class: Dirichlet(alpha), or with ``alpha`` None the split with missing classes.
    Only those frames' labels are read; validation ``{"Seq05VD": all its frames}``."""
    _require_sites(ds, [*CAMVID_TRAINING_SITES, CAMVID_HELD_OUT], preset)
    training = set(CAMVID_TRAINING_SITES)
    ids = [s.id for s in ds.samples() if s.site in training]
    validation = {CAMVID_HELD_OUT: ds.ids(site=CAMVID_HELD_OUT)}
    try:
        if alpha is None:
            part = partition_missing_classes(ds, ids, num_clients, seed, validation=validation)
        else:
            part = partition_dirichlet(ds, ids, num_clients, alpha, seed, validation=validation)
    except DataError as err:
        raise DataError(f"preset {preset!r}: {err}") from None
    part.meta["preset"] = preset
    return part


POLYP_SIZE_BINS = 4  # polyp-size quartiles: the tag of the label-skewed polyp presets


def polyp_size_bins(ds: SegmentationDataset, ids: Sequence[str], bins: int = POLYP_SIZE_BINS,
                    progress: bool = True) -> tuple[dict[str, int], list[float]]:
    """Polyp-size bin of each image among ``ids``: the images are ranked by their polyp area fraction (class-1
    pixels over labelled pixels; ties in the order of ``ids``) and cut into ``bins`` groups of equal size, 0 =
    the smallest polyps. Returns (id -> bin, the smallest fraction of bins 1..bins-1)."""
    if len(ids) < bins:
        raise DataError(f"{ds.name!r}: {len(ids)} images cannot fill {bins} polyp-size bins")
    pixels = label_class_pixels(ds, ids, progress, purpose="a partition by polyp size")
    fraction = np.array([pixels[i][1] / max(int(pixels[i].sum()), 1) for i in ids])
    rank = np.empty(len(ids), np.int64)
    rank[np.argsort(fraction, kind="stable")] = np.arange(len(ids))
    tag = rank * bins // len(ids)
    return ({i: int(t) for i, t in zip(ids, tag)},
            [float(fraction[tag == b].min()) for b in range(1, bins)])


def _polyp_client_names(num_clients: int, preset: str) -> dict[str, list[str]]:
    """Hospital -> its clients (``kvasir-1``, ...): an even number of at least 4 clients, half per hospital."""
    if num_clients < 4 or num_clients % 2:
        raise DataError(f"preset {preset!r}: num_clients must be an even number of at least 4 (half of them per "
                        f"hospital), got {num_clients}")
    return {h: [f"{h}-{j}" for j in range(1, num_clients // 2 + 1)] for h in POLYP_SITES}


def _preset_polyp_skewed(ds: SegmentationDataset, seed: int, num_clients: int, *, preset: str,
                         alpha: float | None) -> Partition:
    """Each hospital's ``train`` images split into half of the clients by polyp-size quartile (within the
    hospital): Dirichlet(alpha) over the quartiles, or with ``alpha`` None the split with missing quartiles (each
    client sees 2 of the 4). Data never crosses hospitals. Only the train lists' labels are read; validation: the
    hospitals' ``test`` lists at sites ``kvasir`` and ``cvc_clinicdb`` (as in preset ``polyp``)."""
    names = _polyp_client_names(num_clients, preset)
    _require_sites(ds, POLYP_SITES, preset)
    if ds.num_classes != 2:
        raise DataError(f"preset {preset!r}: dataset {ds.name!r} has {ds.num_classes} classes, not 2 "
                        f"(background, polyp)")
    clients, bin_counts, edges, seen, attempts = {}, {}, {}, {}, {}
    for h, hospital in enumerate(POLYP_SITES):
        ids = ds.ids(site=hospital, split="train")
        bins, edges[hospital] = polyp_size_bins(ds, ids)
        by_bin, what = group_by_tag(ids, bins), f"the {len(ids)} train images of {hospital!r}"
        try:
            if alpha is None:
                assigned, hospital_seen = missing_split(by_bin, names[hospital], (seed, h), what)
                seen.update(zip(names[hospital], hospital_seen))
            else:
                assigned, attempts[hospital] = dirichlet_split(by_bin, names[hospital], alpha, (seed, h),
                                                                DIRICHLET_MAX_TRIES, what)
        except DataError as err:
            raise DataError(f"preset {preset!r}: {err}") from None
        rank = {i: n for n, i in enumerate(ids)}
        for name, a in zip(names[hospital], assigned):
            clients[name] = sorted(a, key=rank.__getitem__)
            bin_counts[name] = class_histogram([bins[i] for i in a], POLYP_SIZE_BINS)
    validation = {hospital: ds.ids(site=hospital, split="test") for hospital in POLYP_SITES}
    for hospital, ids in validation.items():
        if not ids:
            raise DataError(f"preset {preset!r}: site {hospital!r} of dataset {ds.name!r} has no images in split "
                            f"'test'")
    meta = {"preset": preset, "client_sites": {n: [h] for h, hospital_names in names.items() for n in hospital_names},
            "size_bin_edges": edges, "size_bin_counts": bin_counts}
    meta.update({"size_bins_seen": seen} if alpha is None else {"alpha": float(alpha), "attempt": attempts})
    return Partition(dataset=ds.name, strategy="missing" if alpha is None else "dirichlet", seed=int(seed),
                     num_classes=ds.num_classes, clients=clients, validation=validation, meta=meta)


def _preset_cityscapes(ds: SegmentationDataset, seed: int, num_clients: int) -> Partition:
    k = int(num_clients)
    cities = sorted({s.site for s in ds.samples(split="train")})
    if not cities:
        raise DataError(f"preset 'cityscapes': dataset {ds.name!r} has no images in split 'train'")
    if not 1 <= k <= len(cities):
        raise DataError(f"preset 'cityscapes': num_clients must be in 1..{len(cities)} (the training cities), "
                        f"got {k}")
    groups = {name: [str(c) for c in part]
              for name, part in zip(numbered_client_names(k), np.array_split(np.array(cities, dtype=object), k))}
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
    # Drawing it reads every label of the dataset (COCO's Dirichlet split): too costly to redo in a site's filter,
    # so the site's bounds (``wire.site_bounds``) are the number of images in its dataset.
    bounds_from_dataset_size: bool = False

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
        _preset_cocostuff27, tuple(range(1, 101)), bounds_from_dataset_size=True),
    # Label-skewed federations. CamVid: the 3 training sequences pooled, split by dominant class.
    "camvid-dir0.1": PartitionPreset(
        "camvid", 11, 6, 1, "CamVid's training frames split by dominant class, Dirichlet(0.1), into 6 or 12 "
        "clients client1..; Seq05VD held out for validation",
        partial(_preset_camvid_skewed, preset="camvid-dir0.1", alpha=0.1), (6, 12)),
    "camvid-dir0.5": PartitionPreset(
        "camvid", 11, 6, 1, "CamVid's training frames split by dominant class, Dirichlet(0.5), into 6 or 12 "
        "clients client1..; Seq05VD held out for validation",
        partial(_preset_camvid_skewed, preset="camvid-dir0.5", alpha=0.5), (6, 12)),
    "camvid-missing": PartitionPreset(
        "camvid", 11, 6, 1, "CamVid's training frames in 6 or 12 clients client1.., each holding images of only "
        "about half of the dominant classes; Seq05VD held out for validation",
        partial(_preset_camvid_skewed, preset="camvid-missing", alpha=None), (6, 12)),
    # Polyp: almost every image's dominant class is background, so the tag is the polyp-size quartile.
    "polyp-dir0.1": PartitionPreset(
        "polyp", 2, 4, 2, "each hospital's train list split by polyp-size quartile, Dirichlet(0.1), into 2 or 3 "
        "clients kvasir-1.., cvc_clinicdb-1..; sites kvasir and cvc_clinicdb validate on the test lists",
        partial(_preset_polyp_skewed, preset="polyp-dir0.1", alpha=0.1), (4, 6)),
    "polyp-dir0.5": PartitionPreset(
        "polyp", 2, 4, 2, "each hospital's train list split by polyp-size quartile, Dirichlet(0.5), into 2 or 3 "
        "clients kvasir-1.., cvc_clinicdb-1..; sites kvasir and cvc_clinicdb validate on the test lists",
        partial(_preset_polyp_skewed, preset="polyp-dir0.5", alpha=0.5), (4, 6)),
    "polyp-missing": PartitionPreset(
        "polyp", 2, 4, 2, "each hospital's train list in 2 or 3 clients kvasir-1.., cvc_clinicdb-1.. that each "
        "hold 2 of the 4 polyp-size quartiles; sites kvasir and cvc_clinicdb validate on the test lists",
        partial(_preset_polyp_skewed, preset="polyp-missing", alpha=None), (4, 6)),
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

    Label-skewed federations, reproducible for a seed (``federation.seed``):

    * ``camvid-dir0.1`` / ``camvid-dir0.5``: every frame of CamVid's three training sequences (the frames of
      preset ``camvid``), :func:`partition_dirichlet` with alpha 0.1 / 0.5 into ``num_clients`` (6 by default;
      jobs offer 6 and 12) clients "client1"..; validation ``{"Seq05VD": all its images}``.
    * ``camvid-missing``: the same frames, :func:`partition_missing_classes` (each client holds images of only
      ceil(P / 2) of the P dominant classes; CamVid's training frames have P = 5: sky, building, road, tree, car).
    * ``polyp-dir0.1`` / ``polyp-dir0.5`` / ``polyp-missing``: the dominant class is background in 98 % of the
      polyp images (1426 of the 1450 train images; no CVC-ClinicDB image has a polyp majority), so it cannot
      skew anything; the tag is instead each image's polyp-size quartile within its hospital
      (:func:`polyp_size_bins`). Each hospital's ``train`` images are split into ``num_clients / 2`` clients
      ("kvasir-1".., "cvc_clinicdb-1"..; ``num_clients`` even and at least 4: jobs offer 4 and 6): Dirichlet(0.1 /
      0.5) over the quartiles, or the split with missing quartiles (each client sees 2 of the 4). Images never
      cross hospitals. Validation: the hospitals' ``test`` lists at sites ``kvasir`` and ``cvc_clinicdb``.

    ``num_clients`` None: the preset's ``clients``. Raises ``DataError`` for an unknown preset, a missing site,
    or an impossible number of clients.
    """
    try:
        preset = PRESETS[name]
    except KeyError:
        raise DataError(f"unknown partition preset {name!r}; known: {sorted(PRESETS)}") from None
    return preset.build(ds, int(seed), preset.clients if num_clients is None else int(num_clients))


@dataclass(frozen=True)
class PartitionSpec:
    """The config key ``partition``, parsed (:func:`parse_partition_spec`): exactly one of a manifest file, ``site``
    (one client per site of the dataset) or a preset with an optional number of training sites."""

    manifest: Path | None = None
    preset: str | None = None
    clients: int | None = None  # ``PRESET:N``; None: the preset's own number

    @property
    def is_site(self) -> bool:
        return self.manifest is None and self.preset is None


def parse_partition_spec(spec: str) -> PartitionSpec:
    """``*.json`` or an existing file: a manifest (``fuss partition``); ``site``; ``PRESET`` or ``PRESET:N`` of
    :data:`PRESETS`. Anything else raises ``DataError`` naming the spec and the presets."""
    if spec.endswith(".json") or Path(spec).is_file():
        return PartitionSpec(manifest=Path(spec))
    if spec == "site":
        return PartitionSpec()
    name, sep, count = spec.partition(":")
    if name not in PRESETS:
        raise DataError(f"partition {spec!r} is neither a manifest file, 'site', nor a preset; known presets: "
                        f"{sorted(PRESETS)}")
    if sep and not (count.isdigit() and int(count) >= 1):
        raise DataError(f"partition {spec!r}: the number of clients after ':' must be a whole number >= 1")
    return PartitionSpec(preset=name, clients=int(count) if sep else None)


def preset_site_names(name: str, num_clients: int | None = None) -> tuple[list[str], list[str]]:
    """(training sites, validation-only sites) of a preset's partition, known without reading the data."""
    preset = PRESETS[name]
    k = preset.clients if num_clients is None else int(num_clients)
    if name == "camvid":
        return list(CAMVID_TRAINING_SITES), [CAMVID_HELD_OUT]
    if name == "polyp":
        return list(POLYP_SITES), []
    if preset.dataset == "camvid":  # the label-skewed CamVid presets
        return numbered_client_names(k), [CAMVID_HELD_OUT]
    if preset.dataset == "polyp":  # the label-skewed polyp presets: clients per hospital, the hospitals validate
        return [c for clients in _polyp_client_names(k, name).values() for c in clients], list(POLYP_SITES)
    return numbered_client_names(k), ["val"]


def preset_config(preset: str, clients: int | None = None) -> FussConfig:
    """Default FussConfig of a preset (|C| explicit so the server never needs the data)."""
    p = PRESETS[preset]
    partition = preset if clients in (None, p.clients) else f"{preset}:{clients}"
    return FussConfig.from_dict(
        {"data": {"dataset": p.dataset}, "partition": partition, "train": {"num_clusters": p.num_clusters}}
    )
