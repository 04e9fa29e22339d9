"""Tests of fuss_components.crf: the dense CRF on a two-colour image, its input checks, and one real CamVid image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fuss_components.crf import dense_crf
from fuss_components.metrics import ConfusionMatrix

from conftest import two_halves


def test_crf_fixes_noisy_labels_on_two_flat_halves():
    image, truth, logits = two_halves()
    raw_errors = int((logits.argmax(0) != truth).sum())
    q = dense_crf(image, logits)
    crf_errors = int((q.argmax(0) != truth).sum())
    assert raw_errors >= 100  # the noise really mislabels pixels (about 20 % of 1536)
    assert crf_errors <= 10  # the bilateral term fills each flat colour region
    assert crf_errors < raw_errors


def test_crf_output_is_a_distribution_and_accepts_torch():
    image, _, logits = two_halves(16, 20, seed=1)
    q = dense_crf(image, torch.from_numpy(logits))
    assert q.shape == (2, 16, 20) and q.dtype == np.float32
    assert np.all(q >= 0)
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-4)
    q3 = dense_crf(image, np.concatenate([logits, logits[:1] - 5.0]))  # three classes, C-first
    assert q3.shape == (3, 16, 20)
    np.testing.assert_allclose(q3.sum(axis=0), 1.0, atol=1e-4)


def test_crf_shape_and_type_errors():
    image, _, logits = two_halves(16, 20)
    with pytest.raises(ValueError, match="upsample"):
        dense_crf(image, logits[:, :8, :10])  # low-resolution logits
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        dense_crf(image, logits[0])
    with pytest.raises(ValueError, match="channels-first"):
        dense_crf(np.ascontiguousarray(image.transpose(2, 0, 1)), logits)
    with pytest.raises(TypeError, match="uint8"):
        dense_crf(image.astype(np.float32), logits)
    bad = logits.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dense_crf(image, bad)


def test_crf_handles_non_contiguous_inputs():
    image, truth, logits = two_halves(16, 20, seed=2)
    # transposed views: Fortran-ordered / strided memory must be copied into C order before pydensecrf
    img_view = np.asfortranarray(image)
    logit_view = np.asfortranarray(logits)
    assert not img_view.flags.c_contiguous and not logit_view.flags.c_contiguous
    np.testing.assert_allclose(dense_crf(img_view, logit_view), dense_crf(image, logits), atol=1e-6)


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_camvid_crf_and_metrics_on_a_real_image():
    from fuss_components.paths import data_root

    try:
        root = data_root() / "camvid"
    except FileNotFoundError as exc:
        pytest.skip(f"shared data folder not found: {exc}")
    labels = sorted((root / "labels").glob("*/*.png")) if (root / "labels").is_dir() else []
    if not labels:
        pytest.skip(f"no CamVid labels under {root / 'labels'}")
    lab_path = labels[0]
    img_path = root / "images" / lab_path.parent.name / (lab_path.stem + ".jpg")
    if not img_path.is_file():
        pytest.skip(f"CamVid image {img_path} missing")

    with Image.open(lab_path) as f:
        label = np.array(f)
    with Image.open(img_path) as f:
        image = np.array(f.convert("RGB"))
    assert label.shape == image.shape[:2]
    k = 11
    valid = label != 255
    assert valid.mean() > 0.5

    rng = np.random.default_rng(0)
    onehot = (label[None] == np.arange(k)[:, None, None]).astype(np.float32)
    logits = 2.0 * onehot + rng.normal(0.0, 1.0, size=onehot.shape).astype(np.float32)
    noisy = logits.argmax(0)
    refined = dense_crf(image, logits).argmax(0)
    noisy_acc = float((noisy == label)[valid].mean())
    crf_acc = float((refined == label)[valid].mean())
    assert 0.4 < noisy_acc < 0.9  # the noise is real
    assert crf_acc > noisy_acc + 0.1

    perfect = ConfusionMatrix(k, k)
    perfect.update(np.where(valid, label, 0), label)
    r = perfect.compute()
    assert r["miou"] == pytest.approx(1.0) and r["pixel_acc"] == pytest.approx(1.0)
    assert r["num_pixels"] == int(valid.sum())

    worse = ConfusionMatrix(k, k)
    worse.update(noisy, label)
    assert worse.compute()["miou"] < 0.9
