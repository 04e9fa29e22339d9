"""Segmentation datasets: the shared folder layout (``meta.json``), a plain folder of unlabeled images, Cityscapes
(27 classes) and COCO-Stuff-27.

Every dataset is a list of :class:`Sample` records (id, site, split, image and label paths) plus two loaders:
``load_image`` (RGB ``PIL.Image``) and ``load_label`` (``uint8 (H, W)`` array with class ids ``0..K-1`` and
``255`` = ignore). Labels are checked when they are loaded: the file exists, it has the image's size, and every
value is a class id or the ignore index. ``check`` finds what it can of the same problems from the file headers
alone, before the long work reads the files. Problems raise :class:`DataError`, whose message names the offending
file or site.

Layouts:

* folder (``FolderDataset``): ``<root>/meta.json`` (``classes``, ``ignore_index``, ``items[]`` with ``id``,
  ``split``, ``site`` and optional descriptive fields), ``images/<split>/<id>.jpg``, ``labels/<split>/<id>.png``.
  A key that is not in :data:`META_KEYS` (top level) or :data:`ITEM_KEYS` (an item) is descriptive: kept (an
  item's in ``Sample.extra``), ignored and listed once in a warning; but one that is one edit away from a known
  key (``clases``, ``spilt``) is refused naming that key, since a misspelt key would otherwise be ignored.
* plain image folder (``ImageFolderDataset``): any folder without ``meta.json``; every image file below it
  (recursively, DICOM included) is one unlabeled training image of one site named after the folder. Such a dataset
  has ``has_labels = False``: extraction, training, site partitions and prediction work, while everything that
  needs labels (evaluation, validation sites, Dirichlet partitions) raises ``DataError`` naming the dataset.
* Cityscapes (``CityscapesDataset``): the official ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png``
  and ``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png``; the 27 classes used by STEGO are the
  label ids 7..33 (class = labelId - 7), every other label id is ignored.
* COCO-Stuff-27 (``CocoStuff27Dataset``): STEGO's layout ``images/<split>/<id>.jpg``,
  ``annotations/<split>/<id>.png`` (fine COCO-Stuff ids 0..181, 255 unlabeled) and the curated image lists
  ``curated/<split>/Coco164kFull_Stuff_Coarse_7.txt``; fine ids are merged into the 27 COCO-Stuff supercategories.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import did_you_mean

log = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "UnknownIdError",
    "Sample",
    "SegmentationDataset",
    "FolderDataset",
    "ImageFolderDataset",
    "CityscapesDataset",
    "CocoStuff27Dataset",
    "CITYSCAPES_CLASSES",
    "COCOSTUFF27_CLASSES",
    "COCOSTUFF_FINE_TO_COARSE",
    "COCOSTUFF_STUFF_NAMES",
    "ITEM_KEYS",
    "META_KEYS",
    "open_dataset",
]

IGNORE_INDEX = 255


class DataError(ValueError):
    """Bad input data; the message names the offending file (path), image id or site."""


class UnknownIdError(DataError, KeyError):
    """An image id that the dataset does not have (a ``DataError`` that is also a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. ``extra`` holds the other per-image fields (e.g. ``fed_split``, ``sequence``)."""

    id: str
    site: str
    split: str
    image_path: Path
    label_path: Path | None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


class SegmentationDataset:
    """Base class: a stable list of samples plus image/label loaders with input checks.

    Subclasses fill ``name``, ``classes``, ``num_classes``, ``ignore_index`` and call :meth:`_set_samples`; a
    subclass whose label files do not hold class ids directly overrides :meth:`_map_label`. A dataset without
    labels sets ``has_labels = False`` (and ``num_classes = 0``: its classes are unknown).
    """

    name: str = "dataset"
    classes: list[str]
    num_classes: int
    ignore_index: int = IGNORE_INDEX
    has_labels: bool = True

    def require_labels(self, purpose: str) -> None:
        """``DataError`` naming the dataset when it has no labels; ``purpose`` says what needed them."""
        if not self.has_labels:
            where = getattr(self, "root", None)
            raise DataError(f"dataset {self.name!r}{f' ({where})' if where else ''} has no labels: {purpose} "
                            f"needs labelled images (a plain image folder supports extraction, training, site "
                            f"partitions and prediction only)")

    def _set_samples(self, samples: list[Sample]) -> None:
        index: dict[str, Sample] = {}
        for s in samples:
            if s.id in index:
                raise DataError(f"{self.name}: duplicate image id {s.id!r} ({index[s.id].image_path} and "
                                f"{s.image_path})")
            index[s.id] = s
        self._samples = list(samples)
        self._index = index

    # ------------------------------------------------------------------ lookup
    def samples(self, split: str | None = None, site: str | None = None) -> list[Sample]:
        """All samples in a stable order (optionally only those of one split and/or site)."""
        return [s for s in self._samples
                if (split is None or s.split == split) and (site is None or s.site == site)]

    def ids(self, split: str | None = None, site: str | None = None) -> list[str]:
        """Image ids in the order of :meth:`samples` (same optional filters)."""
        return [s.id for s in self.samples(split=split, site=site)]

    def sample(self, id: str) -> Sample:  # noqa: A002 - the contract's name
        """The sample with this image id; :class:`UnknownIdError` (a ``DataError`` and ``KeyError``) if none."""
        try:
            return self._index[id]
        except KeyError:
            raise UnknownIdError(f"{self.name}: unknown image id {id!r}") from None

    def sites(self) -> list[str]:
        """Sorted list of the distinct sites."""
        return sorted({s.site for s in self._samples})

    def splits(self) -> list[str]:
        """Sorted list of the distinct splits."""
        return sorted({s.split for s in self._samples})

    def __len__(self) -> int:
        return len(self._samples)

    def __contains__(self, id: object) -> bool:  # noqa: A002
        return id in self._index

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, images={len(self)}, classes={self.num_classes}, "
                f"sites={len(self.sites())})")

    # ------------------------------------------------------------------ loading
    def load_image(self, id: str) -> Image.Image:  # noqa: A002
        """The image as an RGB ``PIL.Image``; ``DataError`` naming the path if it is missing or unreadable."""
        path = self.sample(id).image_path
        try:
            with Image.open(path) as im:
                im.load()
                return to_rgb(im, path)
        except FileNotFoundError:
            raise DataError(f"image file missing: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None

    def image_size(self, id: str) -> tuple[int, int]:  # noqa: A002
        """(width, height) of the image, read from the file header only."""
        path = self.sample(id).image_path
        try:
            with Image.open(path) as im:
                return im.size
        except FileNotFoundError:
            raise DataError(f"image file missing: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None

    def load_label(self, id: str) -> np.ndarray:  # noqa: A002
        """The label as ``uint8 (H, W)`` class ids ``0..K-1`` with ``ignore_index`` (255) for unlabelled pixels.

        Raises ``DataError`` when the label is missing or unreadable (naming the file), when its size differs from
        the image's (naming both files and sizes), or when it holds values that are neither a class id nor the
        ignore index (naming the file and the bad values).
        """
        self.require_labels("reading a label")
        s = self.sample(id)
        if s.label_path is None:
            raise DataError(f"{self.name}: image {id!r} has no label ({s.image_path})")
        path = s.label_path
        raw = _read_label_file(path)
        img_size = self.image_size(id)
        lab_size = (raw.shape[1], raw.shape[0])
        if img_size != lab_size:
            raise DataError(_size_mismatch(path, lab_size, s.image_path, img_size))
        label = self._map_label(raw, path)
        counts = np.bincount(label.ravel(), minlength=256)
        present = np.flatnonzero(counts)
        bad = [int(v) for v in present if v >= self.num_classes and v != self.ignore_index]
        if bad:
            raise DataError(f"label {path} has values {bad[:10]} outside the class ids 0..{self.num_classes - 1} "
                            f"and the ignore index {self.ignore_index}")
        return label

    def _map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Turn the stored label values into class ids (identity for the folder layout)."""
        return raw

    def check(self, ids: Sequence[str], labels: bool = False, on_bad_image: str = "fail") -> dict[str, str]:
        """Check the files of ``ids`` from their headers, before the long work (extraction, evaluation) reads them.

        Each image file is present and its header readable (a DICOM file is decoded). With ``labels`` (on a
        dataset that has labels), each image also has a label file, present, single-channel and of the image's
        size. The ids must be ids of the dataset, each listed once: ``DataError`` otherwise, whatever
        ``on_bad_image``.

        ``on_bad_image="fail"`` (``data.on_bad_image``): ``DataError`` at the first problem, naming the file.
        ``"skip"``: every problem as ``{id: reason}`` (empty when all is well), each reason naming the file.
        """
        self.check_ids(ids)
        problems = {}
        for image_id in ids:
            problem = self._file_problem(image_id, labels and self.has_labels)
            if problem is not None:
                if on_bad_image != "skip":
                    raise DataError(f"{problem} (data.on_bad_image='fail'; 'skip' leaves such images out)")
                problems[image_id] = problem
        return problems

    def check_ids(self, ids: Sequence[str]) -> None:
        """``DataError`` naming the first id that is not the dataset's (``UnknownIdError``) or is listed twice."""
        seen: set[str] = set()
        for image_id in ids:
            self.sample(image_id)
            if image_id in seen:
                raise DataError(f"{self.name}: image id {image_id!r} is listed more than once")
            seen.add(image_id)

    def _file_problem(self, id: str, labels: bool) -> str | None:  # noqa: A002
        """What is wrong with the image (and label) files of ``id``, read from their headers; None if nothing."""
        s = self.sample(id)
        try:
            img_size = self.image_size(id)
            if not labels:
                return None
            if s.label_path is None:
                return f"{self.name}: image {id!r} has no label ({s.image_path})"
            lab_size = _label_header_size(s.label_path)
        except DataError as err:
            return str(err)
        if img_size != lab_size:
            return _size_mismatch(s.label_path, lab_size, s.image_path, img_size)
        return None


def _size_mismatch(label_path: Path, lab_size: tuple[int, int], image_path: Path, img_size: tuple[int, int]) -> str:
    return (f"label {label_path} is {lab_size[0]}x{lab_size[1]} but image {image_path} is "
            f"{img_size[0]}x{img_size[1]} (width x height)")


def _label_header_size(path: Path) -> tuple[int, int]:
    """(width, height) of a label file from its header; ``DataError`` naming the path when it is missing,
    unreadable or not single-channel (what :func:`_read_label_file` would refuse)."""
    try:
        with Image.open(path) as im:
            size, mode, bands = im.size, im.mode, len(im.getbands())
    except FileNotFoundError:
        raise DataError(f"label file missing: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read label {path}: {exc}") from None
    if bands != 1:
        raise DataError(f"label {path} must be a single-channel image of class ids, got mode {mode}")
    return size


def _read_label_file(path: Path) -> np.ndarray:
    """Read a single-channel label PNG as a uint8 (H, W) array; DataError naming the path otherwise."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"label file missing: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read label {path}: {exc}") from None
    if arr.ndim != 2:
        raise DataError(f"label {path} must be a single-channel image of class ids, got mode {mode} "
                        f"with shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "iub" or arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"label {path} holds values outside 0..255 (mode {mode}, dtype {arr.dtype})")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


# ====================================================================== folder layout
# The keys of meta.json: those the loader reads, then the descriptive ones the shared datasets carry.
META_KEYS = frozenset({"name", "classes", "num_classes", "ignore_index", "items",
                       "count", "task", "label_note", "image_format", "site_field", "sites", "splits", "split_note",
                       "fed_split_note", "note", "origin", "license"})
# The keys of an item: id, split and site, then descriptive ones (kept in Sample.extra).
ITEM_KEYS = frozenset({"id", "split", "site", "sequence", "frame", "width", "height", "fed_split", "source_file",
                       "orig_size"})


def one_edit_apart(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by one insertion, deletion, substitution or swap of two neighbouring letters."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def _unknown_meta_keys(where: str, keys: dict, known: frozenset[str]) -> list[str]:
    """The keys of ``keys`` that are not ``known``: descriptive extras, returned to be kept and ignored; but a key
    one edit away from a known one is a typo of a key that matters, and a ``DataError`` names the known one."""
    unknown = sorted(set(keys) - known)
    for key in unknown:
        close = [k for k in sorted(known) if key.lower() == k or one_edit_apart(key.lower(), k)]
        if close:
            raise DataError(f"{where}: unknown key {key!r} (did you mean {' or '.join(map(repr, close))}?); a "
                            f"descriptive key of your own needs a name further from the known ones")
    return unknown


class FolderDataset(SegmentationDataset):
    """A dataset in the shared folder layout: ``meta.json``, ``images/<split>/<id>.jpg``,
    ``labels/<split>/<id>.png``. Any dataset in that layout works without code changes."""

    IMAGE_EXT = ".jpg"
    LABEL_EXT = ".png"

    def __init__(self, root_dir: str | Path):
        self.root = Path(root_dir)
        meta_path = self.root / "meta.json"
        if not self.root.is_dir():
            raise DataError(f"dataset folder not found: {self.root}")
        if not meta_path.is_file():
            raise DataError(f"meta.json not found: {meta_path}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {meta_path}: {exc}") from None
        if not isinstance(meta, dict):
            raise DataError(f"{meta_path}: expected a JSON object")
        extras = {"top level": _unknown_meta_keys(str(meta_path), meta, META_KEYS), "items": set()}
        classes = meta.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{meta_path}: 'classes' must be a non-empty list of names")
        self.meta = meta
        self.name = str(meta.get("name") or self.root.name)
        self.classes = list(classes)
        self.num_classes = int(meta.get("num_classes", len(classes)))
        if self.num_classes != len(classes):
            raise DataError(f"{meta_path}: num_classes {self.num_classes} != {len(classes)} class names")
        self.ignore_index = int(meta.get("ignore_index", IGNORE_INDEX))
        if not (0 <= self.ignore_index <= 255) or self.ignore_index < self.num_classes:
            raise DataError(f"{meta_path}: ignore_index {self.ignore_index} must be in "
                            f"{self.num_classes}..255")
        if self.num_classes > 255:
            raise DataError(f"{meta_path}: at most 255 classes fit a uint8 label")
        items = meta.get("items")
        if not isinstance(items, list):
            raise DataError(f"{meta_path}: 'items' must be a list")
        samples = []
        for n, it in enumerate(items):
            if isinstance(it, dict):
                extras["items"].update(_unknown_meta_keys(f"{meta_path}: items[{n}] (id {it.get('id')!r})", it,
                                                          ITEM_KEYS))
            if not isinstance(it, dict) or not all(isinstance(it.get(k), str) and it.get(k) for k in
                                                   ("id", "split", "site")):
                raise DataError(f"{meta_path}: items[{n}] needs non-empty string fields id, split and site")
            iid, split = it["id"], it["split"]
            samples.append(Sample(
                id=iid, site=it["site"], split=split,
                image_path=self.root / "images" / split / f"{iid}{self.IMAGE_EXT}",
                label_path=self.root / "labels" / split / f"{iid}{self.LABEL_EXT}",
                extra={k: v for k, v in it.items() if k not in ("id", "split", "site")},
            ))
        try:
            self._set_samples(samples)
        except DataError as exc:
            raise DataError(f"{meta_path}: {exc}") from None
        #: the descriptive keys of this meta.json that FUSS does not read (kept: items' in ``Sample.extra``)
        self.extra_keys = {where: sorted(keys) for where, keys in extras.items() if keys}
        if self.extra_keys:
            log.warning("%s: keys FUSS does not read, kept and ignored: %s", meta_path,
                        "; ".join(f"{where}: {', '.join(keys)}" for where, keys in self.extra_keys.items()))


# ====================================================================== plain image folder
IMAGE_FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
DICOM_EXTENSION = ".dcm"
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"  # the DICOM file preamble is 128 bytes, then "DICM"
IMAGE_FOLDER_FILE_EXTENSIONS = IMAGE_FOLDER_EXTENSIONS + (DICOM_EXTENSION,)
ID_SEPARATOR = "__"  # stands for "/" in the id of an image in a sub-folder


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or any file with the ``DICM`` marker at byte 128 (DICOM files often have no extension)."""
    if path.suffix.lower() == DICOM_EXTENSION:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(DICOM_MAGIC_OFFSET)
            return f.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except OSError:
        return False


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL's 16-bit, 32-bit integer and float greys


def to_rgb(im: Image.Image, path: Path | str) -> Image.Image:
    """An opened image as 8-bit RGB, the backbone's input. 8-bit images (any PIL mode: grey, palette, RGBA, CMYK,
    and 16-bit-a-channel colour PNGs, which PIL reads at 8 bits) convert as PIL converts them. 16-bit, 32-bit and
    floating-point grey images (X-ray, microscopy exports) map their own min..max onto 0..255 as DICOM images
    without a window do (:func:`dicom_to_rgb`); PIL's own conversion would clip them to 255 and the backbone would
    see a white (or, for floats in [0, 1], a black) frame. A constant high-depth image is a ``DataError`` naming
    the file: nothing in it can be segmented."""
    if im.mode not in HIGH_DEPTH_MODES:
        return im.convert("RGB")
    values = np.asarray(im, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.min() == finite.max():
        what = "no finite value" if finite.size == 0 else f"the constant value {finite.min():g}"
        raise DataError(f"image {path} (mode {im.mode}) holds {what}: nothing to segment")
    grey = _scale_to_uint8(np.nan_to_num(values, nan=finite.min(), posinf=finite.max(), neginf=finite.min()),
                           (float(finite.min()), float(finite.max())))
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")


def dicom_to_rgb(path: Path) -> Image.Image:
    """A single-frame DICOM image as an 8-bit RGB ``PIL.Image``; ``DataError`` naming the file otherwise.

    Greyscale images: stored values x -> x * RescaleSlope + RescaleIntercept (modality values, e.g. Hounsfield
    units), then the VOI window (first WindowCenter c / WindowWidth w when the tags hold several): values in
    [c - w/2, c + w/2] map linearly onto 0..255 and values outside are clipped; without a (positive) window, the
    image's own min..max is used. MONOCHROME1 (low values are bright) is inverted, and the grey image is repeated
    into 3 channels. Colour images (3 samples per pixel) are scaled to 0..255 if they are not 8-bit already.
    """
    try:
        import pydicom
    except ImportError:  # a dependency of the project; this only helps a partial install
        raise DataError(f"cannot read DICOM image {path}: the pydicom package is not installed") from None
    try:
        ds = pydicom.dcmread(path, force=True)
        pixels = ds.pixel_array
    except FileNotFoundError:
        raise DataError(f"image file missing: {path}") from None
    except Exception as exc:  # pydicom fails in many ways (bad header, no pixel data, codec missing)
        raise DataError(f"cannot read DICOM image {path}: {type(exc).__name__}: {exc}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        raise DataError(f"cannot read DICOM image {path}: {frames} frames; only single-frame images are supported")
    if samples == 3 and pixels.ndim == 3:
        rgb = pixels if pixels.dtype == np.uint8 else _scale_to_uint8(pixels.astype(np.float64), None)
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if samples != 1 or pixels.ndim != 2:
        raise DataError(f"cannot read DICOM image {path}: {samples} samples per pixel with pixel array shape "
                        f"{pixels.shape}; expected a greyscale or RGB image")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = pixels.astype(np.float64) * slope + intercept
    grey = _scale_to_uint8(values, _voi_window(ds))
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")


def _first_value(value) -> float | None:
    """The first of a multi-valued DICOM number (or the number itself); None when absent or not a number."""
    if value is None:
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _voi_window(ds) -> tuple[float, float] | None:
    """(low, high) of the first VOI window of a DICOM dataset, or None without a usable one."""
    centre, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    if centre is None or width is None or not width > 0:
        return None
    return centre - width / 2, centre + width / 2


def _scale_to_uint8(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Values in [low, high] -> 0..255 (rounded, clipped); the array's own min..max without a window."""
    low, high = window if window is not None else (float(values.min()), float(values.max()))
    if high <= low:  # a constant image: all black
        return np.zeros(values.shape, np.uint8)
    scaled = (values - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


class ImageFolderDataset(SegmentationDataset):
    """A plain folder of unlabeled images: the data of one site that brings its own images.

    Every file below ``root`` (recursively, hidden files and folders skipped) with extension .jpg .jpeg .png .tif
    .tiff .bmp (any case), or that is a DICOM file (extension .dcm, or the ``DICM`` marker at byte 128), is one
    image, in sorted order of relative path.

    * id: the path relative to ``root`` without its image extension, with ``/`` replaced by ``__``
      (``ct/p01/slice_003.dcm`` -> ``ct__p01__slice_003``). Ids are file-system safe (one path component: the
      feature cache stores ``<id>.npy``) and unique: two files that would get the same id (``a.png`` beside
      ``a.jpg``, or ``x__y.png`` beside ``x/y.png``) raise ``DataError`` naming both.
    * split: ``"train"``; site: the folder's name, so the ``site`` partition has one client; a federation of
      folders is several sites, each with its own folder (and data root).
    * no labels: ``has_labels`` is False, ``num_classes`` 0 (unknown; ``train.num_clusters`` must be set).

    Images are read as RGB; DICOM files through pydicom (:func:`dicom_to_rgb`). An unreadable file raises
    ``DataError`` naming it, like any other image, so ``data.on_bad_image`` applies.
    """

    has_labels = False

    def __init__(self, root_dir: str | Path, name: str | None = None):
        self.root = Path(root_dir)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self.name = name or self.root.resolve().name
        self.classes = []
        self.num_classes = 0
        self.ignore_index = IGNORE_INDEX
        samples = []
        for path in self._image_files():
            relative = path.relative_to(self.root)
            known_suffix = relative.suffix.lower() in IMAGE_FOLDER_FILE_EXTENSIONS
            stem = relative.with_suffix("") if known_suffix else relative  # DICOM names like 1.2.840.5 keep dots
            dicom = relative.suffix.lower() not in IMAGE_FOLDER_EXTENSIONS
            samples.append(Sample(
                id=ID_SEPARATOR.join(stem.parts), site=self.name, split="train", image_path=path, label_path=None,
                extra={"relative_path": relative.as_posix(), "format": "dicom" if dicom else "image"},
            ))
        if not samples:
            raise DataError(f"no images ({' '.join(IMAGE_FOLDER_FILE_EXTENSIONS)} or DICOM) under {self.root}, "
                            f"and no meta.json of the labelled folder layout")
        self._set_samples(samples)

    def _image_files(self) -> list[Path]:
        found, visited = [], set()
        for folder, subfolders, files in os.walk(self.root, followlinks=True):
            real = os.path.realpath(folder)
            if real in visited:  # a linked folder seen before (or a link cycle): its images are already counted
                subfolders[:] = []
                continue
            visited.add(real)
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in files:
                path = Path(folder) / name
                if name.startswith("."):
                    continue
                if path.suffix.lower() in IMAGE_FOLDER_FILE_EXTENSIONS or is_dicom_file(path):
                    found.append(path)
        return sorted(found, key=lambda p: p.relative_to(self.root).as_posix())

    def _is_dicom(self, id: str) -> bool:  # noqa: A002
        return self.sample(id).extra["format"] == "dicom"

    def load_image(self, id: str) -> Image.Image:  # noqa: A002
        if self._is_dicom(id):
            return dicom_to_rgb(self.sample(id).image_path)
        return super().load_image(id)

    def image_size(self, id: str) -> tuple[int, int]:  # noqa: A002
        if self._is_dicom(id):
            return self.load_image(id).size
        return super().image_size(id)


# ====================================================================== Cityscapes
# Cityscapes label ids 7..33 in order (labels.py of cityscapesScripts); class = labelId - 7, as in STEGO.
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
]
CITYSCAPES_FIRST_ID = 7
_CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, np.uint8)
_CITYSCAPES_LUT[CITYSCAPES_FIRST_ID:CITYSCAPES_FIRST_ID + len(CITYSCAPES_CLASSES)] = np.arange(
    len(CITYSCAPES_CLASSES), dtype=np.uint8)


class CityscapesDataset(SegmentationDataset):
    """Cityscapes in the official layout, 27 classes (label ids 7..33 -> 0..26, the rest ignored).

    id = ``<city>_<seq>_<frame>``, site = city, split = the ``leftImg8bit`` sub-folder (train/val/test).
    ``label_path`` is None where no ``gtFine`` labelIds file exists.
    """

    IMAGE_SUFFIX = "_leftImg8bit.png"
    LABEL_SUFFIX = "_gtFine_labelIds.png"
    SPLITS = ("train", "val", "test")

    def __init__(self, root: str | Path, splits: tuple[str, ...] | list[str] | None = None):
        self.root = Path(root)
        self.name = "cityscapes"
        self.classes = list(CITYSCAPES_CLASSES)
        self.num_classes = len(CITYSCAPES_CLASSES)
        self.ignore_index = IGNORE_INDEX
        img_root = self.root / "leftImg8bit"
        if not img_root.is_dir():
            raise DataError(f"Cityscapes image folder not found: {img_root}")
        samples = []
        for split in splits or self.SPLITS:
            split_dir = img_root / split
            if not split_dir.is_dir():
                if splits:
                    raise DataError(f"Cityscapes split folder not found: {split_dir}")
                continue
            for city_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                city = city_dir.name
                for img in sorted(city_dir.glob(f"*{self.IMAGE_SUFFIX}")):
                    iid = img.name[: -len(self.IMAGE_SUFFIX)]
                    parts = iid.split("_")
                    if len(parts) < 3 or "_".join(parts[:-2]) != city:
                        raise DataError(f"Cityscapes image name {img} is not <city>_<seq>_<frame>"
                                        f"{self.IMAGE_SUFFIX} with city {city!r}")
                    lab = self.root / "gtFine" / split / city / f"{iid}{self.LABEL_SUFFIX}"
                    samples.append(Sample(
                        id=iid, site=city, split=split, image_path=img,
                        label_path=lab if lab.is_file() else None,
                        extra={"city": city, "sequence": parts[-2], "frame": parts[-1]},
                    ))
        if not samples:
            raise DataError(f"no Cityscapes images (*{self.IMAGE_SUFFIX}) under {img_root}")
        self._set_samples(samples)

    def _map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        return _CITYSCAPES_LUT[raw]


# ====================================================================== COCO-Stuff-27
# COCO-Stuff label hierarchy (Caesar et al., CVPR 2018; cocostuff labels.md / cocostuffhelper). Fine ids are the
# values of the stuffthingmaps PNGs: COCO-Stuff id - 1, i.e. 0..90 things (80 COCO classes + 11 ids removed from
# COCO, kept in their supercategory), 91..181 stuff, 255 unlabeled.
# Coarse ids follow STEGO / PiCIE: the 12 thing supercategories (0..11), then the 15 stuff ones (12..26).
_THING_SUPERCATEGORIES: list[tuple[str, range]] = [  # contiguous fine-id ranges
    ("electronic", range(71, 77)),   # tv, laptop, mouse, remote, keyboard, cell phone
    ("appliance", range(77, 83)),    # microwave, oven, toaster, sink, refrigerator, blender*
    ("food", range(51, 61)),         # banana, apple, sandwich, orange, broccoli, carrot, hot dog, pizza, donut, cake
    ("furniture", range(61, 71)),    # chair, couch, potted plant, bed, mirror*, dining table, window*, desk*,
                                     # toilet, door*
    ("indoor", range(83, 91)),       # book, clock, vase, scissors, teddy bear, hair drier, toothbrush, hair brush*
    ("kitchen", range(43, 51)),      # bottle, plate*, wine glass, cup, fork, knife, spoon, bowl
    ("accessory", range(25, 33)),    # hat*, backpack, umbrella, shoe*, eye glasses*, handbag, tie, suitcase
    ("animal", range(15, 25)),       # bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe
    ("outdoor", range(9, 15)),       # traffic light, fire hydrant, street sign*, stop sign, parking meter, bench
    ("person", range(0, 1)),         # person
    ("sports", range(33, 43)),       # frisbee, skis, snowboard, sports ball, kite, baseball bat, baseball glove,
                                     # skateboard, surfboard, tennis racket
    ("vehicle", range(1, 9)),        # bicycle, car, motorcycle, airplane, bus, train, truck, boat
]                                    # (* = one of the 11 classes removed from COCO detection)

# The 91 stuff classes in id order (fine ids 91..181).
COCOSTUFF_STUFF_NAMES = [
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
]
_FIRST_STUFF_ID = 91
_STUFF_SUPERCATEGORIES: list[tuple[str, list[str]]] = [
    ("ceiling", ["ceiling-other", "ceiling-tile"]),
    ("floor", ["carpet", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood"]),
    ("food", ["food-other", "fruit", "salad", "vegetable"]),
    ("furniture", ["cabinet", "counter", "cupboard", "desk-stuff", "door-stuff", "furniture-other", "light",
                   "mirror-stuff", "shelf", "stairs", "table"]),
    ("rawmaterial", ["cardboard", "metal", "paper", "plastic"]),
    ("textile", ["banner", "blanket", "cloth", "clothes", "curtain", "mat", "napkin", "pillow", "rug",
                 "textile-other", "towel"]),
    ("wall", ["wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood"]),
    ("window", ["window-blind", "window-other"]),
    ("building", ["bridge", "building-other", "house", "roof", "skyscraper", "tent"]),
    ("ground", ["dirt", "gravel", "ground-other", "mud", "pavement", "platform", "playingfield", "railroad",
                "road", "sand", "snow"]),
    ("plant", ["branch", "bush", "flower", "grass", "leaves", "moss", "plant-other", "straw", "tree"]),
    ("sky", ["clouds", "sky-other"]),
    ("solid", ["hill", "mountain", "rock", "solid-other", "stone", "wood"]),
    ("structural", ["cage", "fence", "net", "railing", "structural-other"]),
    ("water", ["fog", "river", "sea", "water-other", "waterdrops"]),
]

COCOSTUFF_NUM_FINE = 182
COCOSTUFF27_CLASSES = ([f"{n}-things" for n, _ in _THING_SUPERCATEGORIES]
                       + [f"{n}-stuff" for n, _ in _STUFF_SUPERCATEGORIES])


def _build_fine_to_coarse() -> np.ndarray:
    table = np.full(COCOSTUFF_NUM_FINE, -1, np.int16)
    for coarse, (_, fine_ids) in enumerate(_THING_SUPERCATEGORIES):
        for f in fine_ids:
            assert table[f] == -1, f"fine id {f} in two thing supercategories"
            table[f] = coarse
    stuff_id = {name: _FIRST_STUFF_ID + i for i, name in enumerate(COCOSTUFF_STUFF_NAMES)}
    for k, (_, names) in enumerate(_STUFF_SUPERCATEGORIES):
        for name in names:
            f = stuff_id[name]
            assert table[f] == -1, f"stuff class {name} in two supercategories"
            table[f] = len(_THING_SUPERCATEGORIES) + k
    assert (table >= 0).all(), f"fine ids without a supercategory: {np.flatnonzero(table < 0).tolist()}"
    return table.astype(np.uint8)


#: fine COCO-Stuff id (0..181) -> coarse class (0..26); a 182-entry uint8 array.
COCOSTUFF_FINE_TO_COARSE = _build_fine_to_coarse()
_COCO_LUT = np.full(256, IGNORE_INDEX, np.uint8)
_COCO_LUT[:COCOSTUFF_NUM_FINE] = COCOSTUFF_FINE_TO_COARSE


class CocoStuff27Dataset(SegmentationDataset):
    """COCO-Stuff 164k with the 27 supercategory classes, in STEGO's layout.

    Images come from the curated list ``curated/<split>/<image_list>`` of each split present (``train2017``,
    ``val2017``); where that list is absent every image of the split is used and a warning says so.
    split = the folder name (``train2017`` / ``val2017``), site = ``"coco"`` (no natural sites).
    """

    SPLITS = ("train2017", "val2017")
    DEFAULT_LIST = "Coco164kFull_Stuff_Coarse_7.txt"

    def __init__(self, root: str | Path, splits: tuple[str, ...] | list[str] | None = None,
                 image_list: str | None = DEFAULT_LIST):
        self.root = Path(root)
        self.name = "cocostuff27"
        self.classes = list(COCOSTUFF27_CLASSES)
        self.num_classes = len(COCOSTUFF27_CLASSES)
        self.ignore_index = IGNORE_INDEX
        img_root = self.root / "images"
        if not img_root.is_dir():
            raise DataError(f"COCO-Stuff image folder not found: {img_root}")
        samples = []
        for split in splits or self.SPLITS:
            split_dir = img_root / split
            if not split_dir.is_dir():
                if splits:
                    raise DataError(f"COCO-Stuff split folder not found: {split_dir}")
                continue
            list_path = self.root / "curated" / split / image_list if image_list else None
            if list_path is not None and list_path.is_file():
                ids = [ln.strip() for ln in list_path.read_text().splitlines() if ln.strip()]
                curated = True
            else:
                if list_path is not None:
                    warnings.warn(f"COCO-Stuff curated image list {list_path} not found: using all "
                                  f"{split} images", stacklevel=2)
                ids = sorted(p.stem for p in split_dir.glob("*.jpg"))
                curated = False
            for iid in ids:
                samples.append(Sample(
                    id=iid, site="coco", split=split, image_path=split_dir / f"{iid}.jpg",
                    label_path=self.root / "annotations" / split / f"{iid}.png",
                    extra={"curated": curated},
                ))
        if not samples:
            raise DataError(f"no COCO-Stuff images under {img_root}")
        self._set_samples(samples)

    def _map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        counts = np.bincount(raw.ravel(), minlength=256)
        bad = [int(v) for v in np.flatnonzero(counts[COCOSTUFF_NUM_FINE:]) + COCOSTUFF_NUM_FINE
               if v != IGNORE_INDEX]
        if bad:
            raise DataError(f"label {path} has values {bad[:10]} outside the fine COCO-Stuff ids "
                            f"0..{COCOSTUFF_NUM_FINE - 1} and 255 (unlabeled)")
        return _COCO_LUT[raw]


# ====================================================================== factory
def open_dataset(name: str, root: str | Path) -> SegmentationDataset:
    """Open a dataset by name under a data root.

    ``"cityscapes"`` -> :class:`CityscapesDataset` on ``root/cityscapes`` if that folder exists, else ``root``;
    ``"cocostuff27"`` -> :class:`CocoStuff27Dataset` on ``root/cocostuff`` if it exists, else ``root``;
    any other name -> :class:`FolderDataset` on ``root/<name>`` when it holds a ``meta.json``, else
    :class:`ImageFolderDataset` (a plain folder of unlabeled images) on it; ``DataError`` naming the path if the
    folder is missing.
    """
    root = Path(root).expanduser()
    if name == "cityscapes":
        sub = root / "cityscapes"
        return CityscapesDataset(sub if sub.is_dir() else root)
    if name == "cocostuff27":
        sub = root / "cocostuff"
        return CocoStuff27Dataset(sub if sub.is_dir() else root)
    folder = root / name
    if not folder.is_dir():
        raise DataError(f"unknown dataset {name!r}: no folder {folder}")
    if not (folder / "meta.json").exists():
        return ImageFolderDataset(folder, name=name)
    return FolderDataset(folder)
