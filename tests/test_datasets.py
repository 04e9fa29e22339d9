"""Dataset loaders: folder layout, Cityscapes (27 classes) and COCO-Stuff-27 on tiny fixtures generated here in the
official directory layouts, plus the bad-input errors (each must name the offending file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fuss_components.datasets import (
    COCOSTUFF27_CLASSES,
    COCOSTUFF_FINE_TO_COARSE,
    CityscapesDataset,
    CocoStuff27Dataset,
    DataError,
    FolderDataset,
    ImageFolderDataset,
    Sample,
    open_dataset,
)

from conftest import make_image_folder, write_dicom

H, W = 32, 64

# ---------------------------------------------------------------------------------------------- fixture builders
# Cityscapes: split -> city -> number of images. "test" images get no gtFine file.
CITYSCAPES_LAYOUT = {
    "train": {"aachen": 2, "bochum": 2, "bremen": 2},
    "val": {"frankfurt": 2},
    "test": {"berlin": 1},
}
# Label ids written in vertical stripes into every Cityscapes label, and the class each must become.
CS_LABEL_IDS = [0, 1, 6, 7, 8, 20, 26, 33, 34, 255]
CS_EXPECTED = [255, 255, 255, 0, 1, 13, 19, 26, 255, 255]


def _rgb(rng: np.random.Generator, h: int = H, w: int = W) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _stripes(values: list[int], h: int = H, w: int = W) -> np.ndarray:
    """(h, w) uint8 with len(values) vertical stripes of the given values (first stripe absorbs the rest)."""
    lab = np.full((h, w), values[0], np.uint8)
    step = w // len(values)
    for k, v in enumerate(values):
        lab[:, w - (len(values) - k) * step: w - (len(values) - k - 1) * step] = v
    return lab


def make_cityscapes(root: Path) -> Path:
    """Write a tiny Cityscapes in the official layout under root/cityscapes; returns that folder."""
    rng = np.random.default_rng(0)
    cs = root / "cityscapes"
    for split, cities in CITYSCAPES_LAYOUT.items():
        for city, n in cities.items():
            (cs / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (cs / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                iid = f"{city}_{i:06d}_000019"
                _rgb(rng).save(cs / "leftImg8bit" / split / city / f"{iid}_leftImg8bit.png")
                if split != "test":
                    Image.fromarray(_stripes(CS_LABEL_IDS)).save(
                        cs / "gtFine" / split / city / f"{iid}_gtFine_labelIds.png")
                    # other gtFine files of the official layout must be ignored
                    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(
                        cs / "gtFine" / split / city / f"{iid}_gtFine_color.png")
    return cs


# COCO-Stuff: fine ids and the coarse class each must become (STEGO / COCO-Stuff hierarchy).
COCO_FINE = [0, 2, 17, 62, 91, 119, 148, 156, 170, 181, 255]
COCO_EXPECTED = [9, 11, 7, 3, 17, 26, 21, 23, 18, 24, 255]
# split -> (image ids on disk, curated list or None)
COCO_LAYOUT = {
    "train2017": ([f"{i:012d}" for i in range(1, 9)], ["000000000007", "000000000002", "000000000005",
                                                        "000000000001", "000000000008", "000000000003"]),
    "val2017": ([f"{i:012d}" for i in range(101, 105)], ["000000000103", "000000000101"]),
}


def make_cocostuff(root: Path, dominant: dict[str, int] | None = None, with_lists: bool = True) -> Path:
    """Write a tiny COCO-Stuff in STEGO's layout under root/cocostuff; returns that folder.

    Every label holds the stripes COCO_FINE; with `dominant` (id -> fine id) the left half of that image is the
    given fine id instead, so it becomes the image's dominant class."""
    rng = np.random.default_rng(1)
    cc = root / "cocostuff"
    for split, (ids, curated) in COCO_LAYOUT.items():
        for d in ("images", "annotations", "curated"):
            (cc / d / split).mkdir(parents=True, exist_ok=True)
        for iid in ids:
            _rgb(rng).save(cc / "images" / split / f"{iid}.jpg")
            lab = _stripes(COCO_FINE)
            if dominant and iid in dominant:
                lab[:, : W // 2 + 4] = dominant[iid]
            Image.fromarray(lab).save(cc / "annotations" / split / f"{iid}.png")
        if with_lists:
            (cc / "curated" / split / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(curated) + "\n")
    return cc


def make_folder_dataset(root: Path, name: str = "mini", sites: dict[str, dict[str, int]] | None = None,
                        classes: tuple[str, ...] = ("bg", "a", "b"), size: tuple[int, int] = (12, 16),
                        dominant: list[int] | None = None) -> Path:
    """Write a dataset in the shared folder layout: sites -> {split: count}. Label of image n: background 0,
    a top band of class dominant[n] (covering 3/4 of the image when given), a 255 border pixel row."""
    sites = sites or {"s1": {"train": 3}, "s2": {"train": 2, "test": 1}}
    rng = np.random.default_rng(2)
    ds = root / name
    items, n = [], 0
    h, w = size
    for site, splits in sites.items():
        for split, count in splits.items():
            (ds / "images" / split).mkdir(parents=True, exist_ok=True)
            (ds / "labels" / split).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                iid = f"{site}_{split}_{i:03d}"
                lab = np.zeros((h, w), np.uint8)
                cls = dominant[n] if dominant is not None else 1 + n % (len(classes) - 1)
                lab[: (3 * h) // 4] = cls
                lab[-1] = 255
                _rgb(rng, h, w).save(ds / "images" / split / f"{iid}.jpg")
                Image.fromarray(lab).save(ds / "labels" / split / f"{iid}.png")
                items.append({"id": iid, "split": split, "site": site, "width": w, "height": h, "frame": n})
                n += 1
    meta = {"name": name, "classes": list(classes), "num_classes": len(classes), "ignore_index": 255,
            "count": len(items), "items": items}
    (ds / "meta.json").write_text(json.dumps(meta))
    return ds


# ---------------------------------------------------------------------------------------------- folder layout
def test_folder_dataset_samples_and_loading(tmp_path):
    ds = FolderDataset(make_folder_dataset(tmp_path))
    assert ds.name == "mini" and ds.classes == ["bg", "a", "b"] and ds.num_classes == 3 and ds.ignore_index == 255
    assert ds.ids() == ["s1_train_000", "s1_train_001", "s1_train_002", "s2_train_000", "s2_train_001",
                        "s2_test_000"]
    assert ds.sites() == ["s1", "s2"]
    assert ds.ids(split="test") == ["s2_test_000"]
    s = ds.sample("s2_test_000")
    assert isinstance(s, Sample) and s.site == "s2" and s.split == "test"
    assert s.image_path == tmp_path / "mini" / "images" / "test" / "s2_test_000.jpg"
    assert s.label_path == tmp_path / "mini" / "labels" / "test" / "s2_test_000.png"
    assert s.extra == {"width": 16, "height": 12, "frame": 5}
    img = ds.load_image("s1_train_001")
    assert img.mode == "RGB" and img.size == (16, 12)
    lab = ds.load_label("s1_train_001")  # image n=1 -> class 2
    assert lab.dtype == np.uint8 and lab.shape == (12, 16)
    assert lab[0, 0] == 2 and lab[10, 0] == 0 and lab[11, 5] == 255
    assert sorted(np.unique(lab).tolist()) == [0, 2, 255]


def test_open_dataset_folder_and_unknown(tmp_path):
    make_folder_dataset(tmp_path, name="other")
    ds = open_dataset("other", tmp_path)
    assert isinstance(ds, FolderDataset) and len(ds) == 6
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope"))):
        open_dataset("nope", tmp_path)
    (tmp_path / "empty").mkdir()  # neither meta.json nor images: a plain image folder without images
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "empty")) + ".*no meta.json"):
        open_dataset("empty", tmp_path)


def test_unknown_id_is_data_error_and_key_error(tmp_path):
    ds = FolderDataset(make_folder_dataset(tmp_path))
    with pytest.raises(DataError, match="no_such_id") as exc:
        ds.sample("no_such_id")
    assert isinstance(exc.value, KeyError)
    with pytest.raises(KeyError):
        ds.load_label("no_such_id")


def test_unreadable_image_names_path(tmp_path):
    ds = FolderDataset(make_folder_dataset(tmp_path))
    path = ds.sample("s1_train_000").image_path
    path.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=re.escape(str(path))):
        ds.load_image("s1_train_000")
    with pytest.raises(DataError, match=re.escape(str(path))):  # the label check reads the image size
        ds.load_label("s1_train_000")
    truncated = ds.sample("s1_train_001").image_path
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(DataError, match=re.escape(str(truncated))):
        ds.load_image("s1_train_001")
    missing = ds.sample("s1_train_002").image_path
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(str(missing))):
        ds.load_image("s1_train_002")


def test_label_size_mismatch_names_both_files(tmp_path):
    ds = FolderDataset(make_folder_dataset(tmp_path))
    s = ds.sample("s1_train_000")
    Image.fromarray(np.zeros((12, 15), np.uint8)).save(s.label_path)
    with pytest.raises(DataError) as exc:
        ds.load_label("s1_train_000")
    msg = str(exc.value)
    assert str(s.label_path) in msg and str(s.image_path) in msg
    assert "15x12" in msg and "16x12" in msg


def test_label_out_of_range_names_file_and_values(tmp_path):
    ds = FolderDataset(make_folder_dataset(tmp_path))
    s = ds.sample("s2_train_000")
    lab = np.zeros((12, 16), np.uint8)
    lab[0, 0], lab[1, 1] = 3, 77  # 3 classes: 3 and 77 are neither class ids nor 255
    Image.fromarray(lab).save(s.label_path)
    with pytest.raises(DataError) as exc:
        ds.load_label("s2_train_000")
    msg = str(exc.value)
    assert str(s.label_path) in msg and "[3, 77]" in msg


def test_label_missing_or_rgb_names_file(tmp_path):
    ds = FolderDataset(make_folder_dataset(tmp_path))
    s = ds.sample("s1_train_000")
    s.label_path.unlink()
    with pytest.raises(DataError, match=re.escape(str(s.label_path))):
        ds.load_label("s1_train_000")
    s2 = ds.sample("s1_train_001")
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(s2.label_path)
    with pytest.raises(DataError, match=re.escape(str(s2.label_path))):
        ds.load_label("s1_train_001")


def test_bad_meta_json(tmp_path):
    root = make_folder_dataset(tmp_path)
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["items"][1]["id"] = meta["items"][0]["id"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="duplicate image id 's1_train_000'") as exc:
        FolderDataset(root)
    assert str(meta_path) in str(exc.value)
    del meta["items"][0]["site"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"items\[0\]"):
        FolderDataset(root)
    meta_path.write_text("{not json")
    with pytest.raises(DataError, match=re.escape(str(meta_path))):
        FolderDataset(root)


@pytest.mark.parametrize("where, key, hint", [
    ("top", "clases", "did you mean 'classes'?)"),
    ("top", "Items", "did you mean 'items'?)"),
    ("top", "ignore_indx", "did you mean 'ignore_index'?)"),
    ("item", "spilt", "did you mean 'split'?)"),
    ("item", "widht", "did you mean 'width'?)"),
    ("item", "sites", "did you mean 'site'?)"),
])
def test_a_meta_json_key_one_edit_from_a_known_one_is_refused_naming_it(tmp_path, where, key, hint):
    root = make_folder_dataset(tmp_path)
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text())
    (meta if where == "top" else meta["items"][2])[key] = "x"
    meta_path.write_text(json.dumps(meta))
    place = f"{meta_path}" if where == "top" else f"{meta_path}: items[2] (id 's1_train_002')"
    with pytest.raises(DataError) as err:
        FolderDataset(root)
    assert str(err.value).startswith(f"{place}: unknown key {key!r} ({hint}")


def test_descriptive_meta_json_keys_of_a_new_dataset_are_kept_ignored_and_listed_once(tmp_path, caplog):
    root = make_folder_dataset(tmp_path)
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["acquisition_protocol"] = "chest PA"
    meta["ignore_idx"] = 3  # two edits from ignore_index: a descriptive key, so not read (the default stays)
    for n, item in enumerate(meta["items"]):
        item.update({"patient_id": f"p{n % 3}", "scanner": "X200", "acquired": "2026-01-02"})
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="fuss_components.datasets"):
        ds = FolderDataset(root)
    assert ds.ignore_index == 255 and len(ds) == len(meta["items"])
    assert ds.extra_keys == {"top level": ["acquisition_protocol", "ignore_idx"],
                             "items": ["acquired", "patient_id", "scanner"]}
    assert ds.sample(meta["items"][4]["id"]).extra["patient_id"] == "p1"  # kept with the item
    warnings = [r.getMessage() for r in caplog.records if "kept and ignored" in r.getMessage()]
    assert warnings == [f"{meta_path}: keys FUSS does not read, kept and ignored: top level: acquisition_protocol, "
                        "ignore_idx; items: acquired, patient_id, scanner"]


def test_shared_descriptive_meta_keys_are_accepted(tmp_path):
    root = make_folder_dataset(tmp_path)
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(task="t", label_note="n", sites={}, splits={}, license="l", note="poc copy")
    meta["items"][0].update(sequence="seq", fed_split="test", source_file="a.png", orig_size=[1, 2])
    meta_path.write_text(json.dumps(meta))
    assert FolderDataset(root).sample("s1_train_000").extra["fed_split"] == "test"


def test_check_reads_headers_and_names_each_bad_file(tmp_path):
    ds = FolderDataset(make_folder_dataset(tmp_path, sites={"s1": {"train": 6}}))
    ids = ds.ids()
    assert ds.check(ids, labels=True) == {}
    missing_image = ds.sample(ids[0]).image_path
    missing_image.unlink()
    garbled_image = ds.sample(ids[1]).image_path
    garbled_image.write_bytes(b"not a jpeg")
    missing_label = ds.sample(ids[2]).label_path
    missing_label.unlink()
    rgb_label, wide_label = ds.sample(ids[3]).label_path, ds.sample(ids[4]).label_path
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(rgb_label)
    Image.fromarray(np.zeros((12, 17), np.uint8)).save(wide_label)
    problems = ds.check(ids, labels=True, on_bad_image="skip")
    assert problems == {
        ids[0]: f"image file missing: {missing_image}",
        ids[1]: f"cannot read image {garbled_image}: cannot identify image file '{garbled_image}'",
        ids[2]: f"label file missing: {missing_label}",
        ids[3]: f"label {rgb_label} must be a single-channel image of class ids, got mode RGB",
        ids[4]: f"label {wide_label} is 17x12 but image {ds.sample(ids[4]).image_path} is 16x12 (width x height)",
    }
    # without labels only the images count; "fail" stops at the first problem
    assert list(ds.check(ids, on_bad_image="skip")) == ids[:2]
    with pytest.raises(DataError, match=f"^image file missing: {missing_image} \\(data.on_bad_image='fail'"):
        ds.check(ids)
    assert ds.check(ids[5:], labels=True) == {}


def test_check_refuses_unknown_and_repeated_ids_whatever_the_policy(tmp_path):
    ds = FolderDataset(make_folder_dataset(tmp_path))
    with pytest.raises(DataError, match="unknown image id 'nope'"):
        ds.check(["s1_train_000", "nope"], on_bad_image="skip")
    with pytest.raises(DataError, match="^mini: image id 's1_train_001' is listed more than once$"):
        ds.check(["s1_train_001", "s1_train_000", "s1_train_001"], on_bad_image="skip")


# ---------------------------------------------------------------------------------------------- plain image folder
def test_image_folder_ids_sites_and_images(tmp_path):
    folder = make_image_folder(tmp_path, "scans")
    write_dicom(folder / "ct" / "1.2.840.7", np.zeros((4, 6)))  # no extension: found by its DICM marker
    ds = open_dataset("scans", tmp_path)
    assert isinstance(ds, ImageFolderDataset) and not ds.has_labels and ds.num_classes == 0
    # sorted by relative path; "/" -> "__"; only a known image extension is stripped (DICOM names keep dots)
    assert ds.ids() == ["a", "ct__1.2.840.7", "ct__d", "sub__b", "sub__deeper__c"]
    assert ds.sites() == ["scans"] and ds.splits() == ["train"]
    assert ds.sample("sub__deeper__c").image_path == folder / "sub" / "deeper" / "c.tif"
    assert ds.sample("sub__deeper__c").label_path is None
    assert [ds.sample(i).extra["format"] for i in ds.ids()] == ["image", "dicom", "dicom", "image", "image"]
    png = ds.load_image("a")
    assert png.mode == "RGB" and np.array_equal(np.asarray(png), np.asarray(Image.open(folder / "a.png")))
    assert np.array_equal(np.asarray(ds.load_image("sub__deeper__c")),
                          np.asarray(Image.open(folder / "sub" / "deeper" / "c.tif")))
    assert ds.load_image("sub__b").size == (56, 40) and ds.image_size("ct__d") == (56, 40)
    assert ds.load_image("ct__1.2.840.7").size == (6, 4)
    # FolderDataset layout is unaffected: a folder with meta.json still opens as the labelled layout
    assert isinstance(open_dataset("other", make_folder_dataset(tmp_path / "labelled", name="other").parent),
                      FolderDataset)


def test_image_folder_dicom_rescale_and_window(tmp_path):
    stored = np.array([[0, 50, 75, 110], [125, 150, 175, 200]])
    # rescaled 2x - 100: [[-100, 0, 50, 120], [150, 200, 250, 300]]; first window C=100, W=200 -> [0, 200]
    write_dicom(tmp_path / "f" / "ct.dcm", stored, "MONOCHROME2", RescaleSlope=2, RescaleIntercept=-100,
                WindowCenter=[100, 40], WindowWidth=[200, 400])
    # MONOCHROME1 without a window: min-max of the rescaled pixels (0..400), then inverted
    write_dicom(tmp_path / "f" / "xray.dcm", np.array([[0, 100], [300, 400]]), "MONOCHROME1")
    ds = ImageFolderDataset(tmp_path / "f")
    ct = np.asarray(ds.load_image("ct"))
    assert ct.shape == (2, 4, 3) and (ct == ct[:, :, :1]).all()
    # (v - 0) / 200 * 255, rounded and clipped: 50 -> 63.75, 120 -> 153, 150 -> 191.25
    assert ct[:, :, 0].tolist() == [[0, 0, 64, 153], [191, 255, 255, 255]]
    xray = np.asarray(ds.load_image("xray"))[:, :, 0]
    assert xray.tolist() == [[255, 191], [64, 0]]  # 255 - [[0, 63.75], [191.25, 255]]


def test_image_folder_unreadable_files_and_duplicate_ids_name_the_file(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.dcm").write_bytes(b"not a dicom")
    # both would be id "broken": the second file is named in the error
    with pytest.raises(DataError, match="duplicate image id 'broken'.*broken.png"):
        ImageFolderDataset(folder)
    (folder / "broken.png").rename(folder / "broken_png.png")
    ds = ImageFolderDataset(folder)
    with pytest.raises(DataError, match=re.escape(str(folder / "broken_png.png"))):
        ds.load_image("broken_png")
    with pytest.raises(DataError, match="cannot read DICOM image " + re.escape(str(folder / "broken.dcm"))):
        ds.load_image("broken")


def test_image_folder_has_no_labels(tmp_path):
    ds = open_dataset("scans", make_image_folder(tmp_path, "scans").parent)
    with pytest.raises(DataError, match="dataset 'scans'.*has no labels: reading a label"):
        ds.load_label("a")
    with pytest.raises(DataError, match="dataset 'scans'.*has no labels: evaluation"):
        ds.require_labels("evaluation")
    FolderDataset(make_folder_dataset(tmp_path / "labelled")).require_labels("evaluation")  # labelled: no error


# ---------------------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_layout(tmp_path):
    make_cityscapes(tmp_path)
    ds = open_dataset("cityscapes", tmp_path)  # finds root/cityscapes
    assert isinstance(ds, CityscapesDataset)
    assert ds.name == "cityscapes" and ds.num_classes == 27 and len(ds.classes) == 27
    assert ds.classes[0] == "road" and ds.classes[4] == "building" and ds.classes[13] == "traffic sign"
    assert ds.classes[19] == "car" and ds.classes[26] == "bicycle"
    assert len(ds) == 9
    assert ds.sites() == ["aachen", "berlin", "bochum", "bremen", "frankfurt"]
    assert ds.ids(split="train") == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000019",
                                     "bochum_000001_000019", "bremen_000000_000019", "bremen_000001_000019"]
    assert ds.ids(split="val") == ["frankfurt_000000_000019", "frankfurt_000001_000019"]
    s = ds.sample("bochum_000001_000019")
    assert s.site == "bochum" and s.split == "train"
    assert s.image_path.name == "bochum_000001_000019_leftImg8bit.png"
    assert s.label_path.name == "bochum_000001_000019_gtFine_labelIds.png"
    assert s.extra == {"city": "bochum", "sequence": "000001", "frame": "000019"}
    # the folder itself works as a root too
    assert CityscapesDataset(tmp_path / "cityscapes").ids() == ds.ids()
    assert open_dataset("cityscapes", tmp_path / "cityscapes").ids() == ds.ids()
    # test images without gtFine labels: no label path, and loading the label says so
    t = ds.sample("berlin_000000_000019")
    assert t.split == "test" and t.label_path is None
    with pytest.raises(DataError, match="berlin_000000_000019"):
        ds.load_label("berlin_000000_000019")


def test_cityscapes_label_mapping(tmp_path):
    ds = CityscapesDataset(make_cityscapes(tmp_path))
    lab = ds.load_label("frankfurt_000001_000019")
    assert lab.shape == (H, W) and lab.dtype == np.uint8
    step = W // len(CS_LABEL_IDS)
    got = [int(lab[5, W - (len(CS_LABEL_IDS) - k) * step]) for k in range(len(CS_LABEL_IDS))]
    assert got == CS_EXPECTED
    img = ds.load_image("frankfurt_000001_000019")
    assert img.mode == "RGB" and img.size == (W, H)


def test_cityscapes_missing_folder(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "leftImg8bit"))):
        CityscapesDataset(tmp_path)


# ---------------------------------------------------------------------------------------------- COCO-Stuff-27
def test_cocostuff_fine_to_coarse_table():
    t = COCOSTUFF_FINE_TO_COARSE
    assert t.shape == (182,) and t.dtype == np.uint8
    assert len(COCOSTUFF27_CLASSES) == 27 and len(set(COCOSTUFF27_CLASSES)) == 27
    assert np.bincount(t, minlength=27).min() >= 1  # every coarse class is used
    # things: person, bicycle..boat, traffic light, bird, hat (removed from COCO), frisbee, bottle, banana,
    # chair, tv, microwave, book, hair brush (removed)
    assert [int(t[i]) for i in (0, 1, 8, 9, 15, 25, 33, 43, 51, 61, 71, 77, 83, 90)] == \
        [9, 11, 11, 8, 7, 6, 10, 5, 2, 3, 0, 1, 4, 4]
    # stuff: banner, branch, bridge, cabinet, cage, cardboard, carpet, ceiling-other, clouds, fog, food-other,
    # wall-brick, window-blind, wood, light, hill
    assert [int(t[i]) for i in (91, 93, 94, 97, 98, 99, 100, 101, 105, 119, 120, 170, 179, 181, 129, 126)] == \
        [17, 22, 20, 15, 25, 16, 13, 12, 23, 26, 14, 18, 19, 24, 15, 24]
    assert COCOSTUFF27_CLASSES[9].startswith("person") and COCOSTUFF27_CLASSES[23].startswith("sky")
    assert COCOSTUFF27_CLASSES[12].startswith("ceiling") and COCOSTUFF27_CLASSES[26].startswith("water")


def test_cocostuff_layout_and_labels(tmp_path):
    make_cocostuff(tmp_path)
    ds = open_dataset("cocostuff27", tmp_path)  # finds root/cocostuff
    assert isinstance(ds, CocoStuff27Dataset)
    assert ds.name == "cocostuff27" and ds.num_classes == 27 and ds.sites() == ["coco"]
    # curated lists, in list order
    assert ds.ids(split="train2017") == COCO_LAYOUT["train2017"][1]
    assert ds.ids(split="val2017") == COCO_LAYOUT["val2017"][1]
    s = ds.sample("000000000005")
    assert s.image_path == tmp_path / "cocostuff" / "images" / "train2017" / "000000000005.jpg"
    assert s.label_path == tmp_path / "cocostuff" / "annotations" / "train2017" / "000000000005.png"
    lab = ds.load_label("000000000101")
    step = W // len(COCO_FINE)
    got = [int(lab[3, W - (len(COCO_FINE) - k) * step]) for k in range(len(COCO_FINE))]
    assert got == COCO_EXPECTED
    assert ds.load_image("000000000101").size == (W, H)


def test_cocostuff_without_curated_lists_warns(tmp_path):
    cc = make_cocostuff(tmp_path, with_lists=False)
    with pytest.warns(UserWarning, match="Coco164kFull_Stuff_Coarse_7.txt"):
        ds = CocoStuff27Dataset(cc)
    assert ds.ids(split="train2017") == COCO_LAYOUT["train2017"][0]
    assert ds.ids(split="val2017") == COCO_LAYOUT["val2017"][0]


def test_cocostuff_bad_fine_id_names_file(tmp_path):
    ds = CocoStuff27Dataset(make_cocostuff(tmp_path))
    path = ds.sample("000000000103").label_path
    lab = np.zeros((H, W), np.uint8)
    lab[0, :3] = 200  # > 181 and not 255
    Image.fromarray(lab).save(path)
    with pytest.raises(DataError) as exc:
        ds.load_label("000000000103")
    assert str(path) in str(exc.value) and "[200]" in str(exc.value)


# ---------------------------------------------------------------------------- bit depth

def test_high_bit_depth_and_float_images_map_their_own_range_to_8_bits(tmp_path):
    from fuss_components.datasets import to_rgb

    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (12, 20)).astype(np.uint8)
    grey8[0, 0], grey8[0, 1] = 0, 255  # full range: the mapping then gives back exactly these values
    cases = {"png16.png": grey8.astype(np.uint16) * 257, "tif16.tif": grey8.astype(np.uint16) * 257,
             "float.tif": grey8.astype(np.float32) / 255.0, "int32.tif": grey8.astype(np.int32) * 1000 - 50_000}
    for name, array in cases.items():
        Image.fromarray(array).save(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.mode in ("I;16", "F", "I")
            rgb = np.asarray(to_rgb(im, tmp_path / name))
        assert rgb.dtype == np.uint8 and rgb.shape == (12, 20, 3), name
        assert np.array_equal(rgb[..., 0], grey8) and np.array_equal(rgb[..., 1], grey8), name
        # what PIL alone does: 16-bit values clipped to white, floats in [0, 1] nearly black
        with Image.open(tmp_path / name) as im:
            clipped = np.asarray(im.convert("RGB"))
        assert not np.array_equal(clipped[..., 0], grey8), name
    # a 16-bit narrow range (12-bit detector in a 16-bit file) is stretched, not left dark
    Image.fromarray((grey8.astype(np.uint16) * 16)).save(tmp_path / "twelve.png")
    with Image.open(tmp_path / "twelve.png") as im:
        assert np.array_equal(np.asarray(to_rgb(im, "twelve.png"))[..., 2], grey8)
    # 8-bit images convert as before
    Image.fromarray(grey8).save(tmp_path / "eight.png")
    with Image.open(tmp_path / "eight.png") as im:
        assert np.array_equal(np.asarray(to_rgb(im, "eight.png"))[..., 0], grey8)
    # a constant high-depth image is an error naming the file
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "flat.png")
    with Image.open(tmp_path / "flat.png") as im, pytest.raises(DataError, match=r"flat\.png .*constant value 1000"):
        to_rgb(im, tmp_path / "flat.png")


@pytest.mark.realdata
def test_a_camvid_frame_saved_at_16_bits_or_as_floats_is_segmented_as_its_8_bit_original(shared, tmp_path):
    """`fuss predict` (the real backbone; a model with spread random centroids) on one camvid frame as 8-bit grey
    PNG and as 16-bit PNG, 16-bit TIFF and float32 TIFF holding the same grey values: the masks are equal (0
    differing pixels allowed, since the conversion gives back the 8-bit values exactly)."""
    import torch

    from fuss_components.cli import main as fuss
    from fuss_components.config import FussConfig
    from fuss_components.checkpoint import save_model
    from fuss_components.site import init_global_state

    frame = sorted((shared / "data" / "camvid" / "images").rglob("*.*"))[0]
    grey = np.asarray(Image.open(frame).convert("L")).astype(np.float64)
    grey8 = np.rint((grey - grey.min()) / (grey.max() - grey.min()) * 255).astype(np.uint8)  # full 0..255
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(grey8).save(folder / "eight.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(folder / "sixteen.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(folder / "sixteen_tiff.tif")
    Image.fromarray(grey8.astype(np.float32) / 255).save(folder / "float.tif")
    cfg = FussConfig().with_overrides({"data.eval_flip": False})
    state = init_global_state(cfg)
    state["centroids"] = state["centroids"] + 0.5 * torch.randn(state["centroids"].shape,
                                                                generator=torch.Generator().manual_seed(1))
    model = save_model(tmp_path / "model.pt", state, cfg)
    assert fuss(["predict", "--model", str(model), "--images", str(folder), "--out", str(tmp_path / "out")]) == 0
    masks = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "out" / "masks").glob("*.png")}
    assert len(masks) == 4, sorted(masks)
    reference = masks.pop("eight.png")
    assert len(np.unique(reference)) >= 3  # a real segmentation, not one cluster
    for name, mask in masks.items():
        assert np.array_equal(mask, reference), name
