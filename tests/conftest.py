"""Shared fixtures: a tiny synthetic dataset in the standard folder layout, a tiny-backbone config, the
location of the real shared assets (tests marked `realdata` skip with a reason when they are absent), and helpers
several test modules use (model-state equality, a two-colour image for the CRF and overlay tests)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fuss_components.config import FussConfig

# The test federations are far below a hospital's disclosure policy (fuss_components.disclosure: sites of 4-6 tiny
# images with 20 patch codes each, real-data subsets of 6 frames, validation sites of 3-4 images). Every test, and
# every process a test starts, therefore runs under this permissive site policy; the tests of the defaults
# (test_disclosure.py, the hostile-job simulator test) pass a policy explicitly or remove the variable.
TEST_POLICY = {"min_images": 1, "min_validation_images": 1, "min_support_codes": 1, "min_support_images": 1,
               "max_code_cosine": 1.0}
_POLICY_FILE = Path(tempfile.mkdtemp(prefix="fuss_test_policy_")) / "fuss_policy.json"
_POLICY_FILE.write_text(json.dumps(TEST_POLICY))
os.environ["FUSS_SITE_POLICY"] = str(_POLICY_FILE)

SLOW_TIERS = ("realdata", "flare", "slow")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """``-m fast``: the tests that need neither ../shared, FLARE processes nor minutes (docs/testing.md)."""
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in SLOW_TIERS):
            item.add_marker(pytest.mark.fast)


TINY_CLASSES = ["background", "red", "blue"]
TINY_SITES = {"s1": 6, "s2": 5, "s3": 4}  # s3 is held out for validation in `tiny_partition`


def make_tiny_dataset(root: Path, sites: dict[str, int] = TINY_SITES, size: tuple[int, int] = (40, 56),
                      seed: int = 0) -> Path:
    """Write a dataset 'tiny' under root: each image is a grey-noise background with a red and a blue
    rectangle at random places; the label marks them 1 and 2, and a 2-pixel border is ignore (255)."""
    rng = np.random.default_rng(seed)
    ds = root / "tiny"
    items = []
    h, w = size
    for site, count in sites.items():
        for i in range(count):
            iid = f"{site}_{i:03d}"
            img = (rng.normal(110, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
            lab = np.zeros((h, w), np.uint8)
            for cls, colour in ((1, (200, 30, 30)), (2, (30, 40, 210))):
                rh, rw = rng.integers(h // 4, h // 2), rng.integers(w // 4, w // 2)
                y, x = rng.integers(0, h - rh), rng.integers(0, w - rw)
                img[y:y + rh, x:x + rw] = np.array(colour) + rng.normal(0, 8, (rh, rw, 3))
                lab[y:y + rh, x:x + rw] = cls
            lab[:2], lab[-2:], lab[:, :2], lab[:, -2:] = 255, 255, 255, 255
            split = "test" if site == "s3" else "train"
            (ds / "images" / split).mkdir(parents=True, exist_ok=True)
            (ds / "labels" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(ds / "images" / split / f"{iid}.jpg", quality=95)
            Image.fromarray(lab).save(ds / "labels" / split / f"{iid}.png")
            items.append({"id": iid, "split": split, "site": site, "width": w, "height": h})
    meta = {"name": "tiny", "classes": TINY_CLASSES, "num_classes": len(TINY_CLASSES), "ignore_index": 255,
            "count": len(items), "items": items}
    (ds / "meta.json").write_text(json.dumps(meta))
    return root


def write_dicom(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Path:
    """A single-frame 16-bit greyscale DICOM file holding ``stored`` (unsigned), with extra tags such as
    ``RescaleSlope=2, WindowCenter=[100, 50]``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_image_folder(root: Path, name: str, size: tuple[int, int] = (40, 56), seed: int = 0) -> Path:
    """A plain folder ``root/<name>`` of unlabeled images in nested sub-folders: ``a.png``, ``sub/b.jpg``,
    ``sub/deeper/c.tif`` and ``ct/d.dcm`` (a windowed CT-like DICOM), plus files that are not images
    (``notes.txt``, ``.hidden.png``). Returns the folder."""
    rng = np.random.default_rng(seed)
    folder = root / name
    h, w = size
    for rel in ("a.png", "sub/b.jpg", "sub/deeper/c.tif"):
        img = rng.normal(110, 12, (h, w, 3)).clip(0, 255).astype(np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y:y + h // 2, x:x + w // 2] = (200, 30, 30)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / rel)
    write_dicom(folder / "ct" / "d.dcm", rng.integers(0, 300, (h, w)), RescaleSlope=2, RescaleIntercept=-100,
                WindowCenter=100, WindowWidth=200)
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(folder / ".hidden.png")
    return folder


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """Data root holding the synthetic dataset 'tiny' (sites s1, s2 train; s3 test)."""
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def tiny_config(data_root: Path, cache_dir: Path, **overrides) -> FussConfig:
    """A config that runs in seconds: the registered 2-block random ViT, 28 px crops, 2-round federation."""
    base = {
        "backbone": {"name": "fuss_tiny_vit_patch14", "weights": "random", "block": -1},
        "data": {"dataset": "tiny", "root": str(data_root), "train_size": 28, "eval_short_side": 42},
        "train": {"dim": 8, "batch_size": 4, "num_clusters": 3, "knn": 2, "num_random": 2},
        "loss": {"grid": 3},
        "federation": {"rounds": 2, "local_steps": 3},
        "partition": "site",
        "cache_dir": str(cache_dir),
    }
    cfg = FussConfig.from_dict(base)
    return cfg.with_overrides(overrides) if overrides else cfg


@pytest.fixture
def tiny_cfg(tiny_data_root, tmp_path) -> FussConfig:
    return tiny_config(tiny_data_root, tmp_path / "cache")


def equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def two_halves(h: int = 32, w: int = 48, seed: int = 0):
    """A red | blue image with slight pixel noise, its true halves, and noisy 2-class logits."""
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), dtype=np.int64)
    image[:, : w // 2] = (200, 40, 40)
    image[:, w // 2 :] = (40, 40, 200)
    image = np.clip(image + rng.integers(-5, 6, size=image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, w // 2 :] = 1
    onehot = np.stack([truth == 0, truth == 1]).astype(np.float32)
    logits = onehot + rng.normal(0.0, 0.8, size=onehot.shape).astype(np.float32)
    return image, truth, logits


def shared_dir() -> Path | None:
    """The real shared assets folder, or None (realdata tests then skip)."""
    path = Path(os.environ.get("FUSS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return path if (path / "data").is_dir() and (path / "weights").is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("shared assets not found: set FUSS_SHARED to the folder holding data/ and weights/")
    return path


@pytest.fixture
def without_release(monkeypatch):
    """The trainer's centroids as the objective left them, without the site's release rule (every sent centroid the
    mean of its codes, fuss_components.disclosure; tested in test_disclosure.py): for tests of an objective's own
    update of the prototypes."""
    from fuss_components.disclosure import Release
    from fuss_components.trainer import LocalTrainer

    monkeypatch.setattr(LocalTrainer, "release_centroids", lambda self, model, received, seed: Release([], [], []))

