"""Tests of fuss_components.metrics (Hungarian-matched IoU / accuracy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fuss_components.metrics import ConfusionMatrix, hungarian_match, image_weighted_mean

# Hand-made confusion matrix: rows = clusters, columns = classes.
#              class0 class1
#   cluster0    50      5
#   cluster1    10     30
#   cluster2     4      1
HAND = np.array([[50, 5], [10, 30], [4, 1]], dtype=np.int64)


def pixels_from_confusion(m: np.ndarray, rng: np.random.Generator | None = None):
    """pred / target arrays realising the confusion matrix m (optionally shuffled)."""
    pred, target = [], []
    for k in range(m.shape[0]):
        for c in range(m.shape[1]):
            pred += [k] * int(m[k, c])
            target += [c] * int(m[k, c])
    pred, target = np.array(pred, dtype=np.int64), np.array(target, dtype=np.uint8)
    if rng is not None:
        order = rng.permutation(len(pred))
        pred, target = pred[order], target[order]
    return pred, target


def test_hungarian_match_hand_matrix():
    # candidate one-to-one matchings and matched pixels:
    #   c0->0, c1->1: 50 + 30 = 80   <- best
    #   c0->1, c1->0: 5 + 10 = 15;  c0->0, c2->1: 50 + 1 = 51;  c2->0, c1->1: 4 + 30 = 34; ...
    assert hungarian_match(HAND).tolist() == [0, 1, -1]
    # fewer clusters than classes: the cluster goes to its best class, nothing is -1
    assert hungarian_match(np.array([[1, 9, 3]])).tolist() == [1]
    # 1 + 6 = 7 beats 5 + 1 (c0->0, c1->2), 0 + 6 (c0->2, c1->0), ...
    assert hungarian_match(np.array([[5, 1, 0], [6, 0, 1]])).tolist() == [1, 0]


def test_hand_matrix_miou_and_accuracy_count_unmatched_pixels():
    pred, target = pixels_from_confusion(HAND, np.random.default_rng(0))
    cm = ConfusionMatrix(3, 2)
    cm.update(pred.reshape(10, 10), target.reshape(10, 10))
    assert cm.counts.tolist() == HAND.tolist()
    r = cm.compute()
    # matching c0->0, c1->1, c2 unmatched (its 4 + 1 pixels are errors, NOT dropped)
    # class 0: TP = 50, FN = 10 (c1) + 4 (c2, unmatched) = 14, FP = 5 (c0 pixels of class 1)
    #          IoU0 = 50 / (50 + 5 + 14) = 50 / 69
    # class 1: TP = 30, FN = 5 (c0) + 1 (c2) = 6, FP = 10 (c1 pixels of class 0)
    #          IoU1 = 30 / (30 + 10 + 6) = 30 / 46
    # mIoU = (50/69 + 30/46) / 2 = (0.724638 + 0.652174) / 2 = 0.688406
    # pixel acc = (50 + 30) / 100 = 0.8   (dropping c2 would give 80 / 95 = 0.842 and IoU0 = 50/65)
    assert r["per_class_iou"] == pytest.approx([50 / 69, 30 / 46])
    assert r["miou"] == pytest.approx((50 / 69 + 30 / 46) / 2)
    assert r["miou"] == pytest.approx(0.688406, abs=1e-6)
    assert r["pixel_acc"] == pytest.approx(0.8)
    assert r["assignment"] == [0, 1, -1]
    assert r["clusters_used"] == 3
    assert r["num_pixels"] == 100


def test_absent_class_excluded_and_unpredicted_class_zero():
    # 2 clusters x 4 classes. class 2: present in target but no cluster is matched to it -> IoU 0, in mean.
    # class 3: never in target; matched to no cluster (only 2 clusters) -> 0/0 -> nan, excluded from mean.
    m = np.array([[20, 0, 5, 0], [0, 10, 5, 0]])
    cm = ConfusionMatrix(2, 4)
    cm.update(*pixels_from_confusion(m))
    r = cm.compute()
    # c0->0: IoU0 = 20 / (20 + 5 FP + 0 FN) = 0.8 ; c1->1: IoU1 = 10 / (10 + 5) = 2/3 ; IoU2 = 0 / 10 = 0
    assert r["assignment"] == [0, 1]
    assert r["per_class_iou"][:3] == pytest.approx([0.8, 2 / 3, 0.0])
    assert math.isnan(r["per_class_iou"][3])
    assert r["miou"] == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)
    assert r["pixel_acc"] == pytest.approx(30 / 40)


def test_permuting_cluster_ids_keeps_scores():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 4, size=(40, 50))
    # a noisy clustering with 6 clusters: mostly cluster = class, 15 % random, part of class 1 split to cluster 5
    pred = np.where(rng.random(target.shape) < 0.85, target, rng.integers(0, 6, size=target.shape))
    pred = np.where((pred == 1) & (rng.random(target.shape) < 0.3), 5, pred)
    perm = rng.permutation(6)
    a, b = ConfusionMatrix(6, 4), ConfusionMatrix(6, 4)
    a.update(pred, target)
    b.update(perm[pred], target)
    ra, rb = a.compute(), b.compute()
    assert ra["miou"] == pytest.approx(rb["miou"], abs=1e-12)
    assert ra["pixel_acc"] == pytest.approx(rb["pixel_acc"], abs=1e-12)
    assert ra["per_class_iou"] == pytest.approx(rb["per_class_iou"])
    # the assignment follows the permutation: cluster k in a is cluster perm[k] in b
    assert [rb["assignment"][perm[k]] for k in range(6)] == ra["assignment"]
    assert 0.5 < ra["miou"] < 1.0


def test_ignore_pixels_are_excluded():
    rng = np.random.default_rng(2)
    target = rng.integers(0, 3, size=(30, 30)).astype(np.uint8)
    pred = rng.integers(0, 3, size=(30, 30))
    clean = ConfusionMatrix(3, 3)
    clean.update(pred, target)
    ignored = rng.random(target.shape) < 0.3
    t2, p2 = target.copy(), pred.copy()
    t2[ignored] = 255
    p2[ignored] = 99  # out-of-range predictions on ignored pixels are not looked at
    with_ignore = ConfusionMatrix(3, 3)
    with_ignore.update(p2, t2)
    expected = ConfusionMatrix(3, 3)
    expected.update(pred[~ignored], target[~ignored])
    assert with_ignore.counts.tolist() == expected.counts.tolist()
    assert with_ignore.compute()["num_pixels"] == int((~ignored).sum()) < 900
    assert clean.compute()["num_pixels"] == 900


def test_clusters_used_counts_only_valid_pixels():
    target = np.array([[0, 1, 2, 255], [1, 0, 255, 2]], dtype=np.uint8)
    pred = np.array([[0, 2, 5, 3], [2, 0, 3, 5]])  # cluster 3 appears only on ignored pixels
    cm = ConfusionMatrix(8, 3)
    cm.update(pred, target)
    r = cm.compute()
    assert r["clusters_used"] == 3  # {0, 2, 5}
    assert r["pixel_acc"] == pytest.approx(1.0)
    assert r["miou"] == pytest.approx(1.0)


def test_torch_inputs_equal_numpy():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 5, size=(2, 16, 16))
    pred = rng.integers(0, 7, size=(2, 16, 16))
    a, b = ConfusionMatrix(7, 5), ConfusionMatrix(7, 5)
    a.update(pred, target)
    b.update(torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8))
    assert a.counts.tolist() == b.counts.tolist()
    assert a.counts.sum() == 512


@pytest.mark.parametrize(
    "pred,target,match",
    [
        ([0, 3, 1], [0, 1, 1], r"pred.*\[3\]"),
        ([0, -1, 1], [0, 1, 1], r"pred.*\[-1\]"),
        ([0, 1, 1], [0, 2, 7], r"target.*\[2, 7\]"),
    ],
)
def test_bad_values_raise(pred, target, match):
    cm = ConfusionMatrix(3, 2)
    with pytest.raises(ValueError, match=match):
        cm.update(np.array(pred), np.array(target))
    assert cm.counts.sum() == 0  # nothing half-added


def test_bad_shapes_and_types_raise():
    cm = ConfusionMatrix(3, 2)
    with pytest.raises(ValueError, match="shapes differ"):
        cm.update(np.zeros((2, 3), dtype=int), np.zeros((3, 2), dtype=int))
    with pytest.raises(TypeError, match="integer"):
        cm.update(np.zeros(4, dtype=np.float32), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, 5, ignore_index=2)


def test_merge_equals_single_update_and_roundtrip():
    rng = np.random.default_rng(4)
    t1, t2 = rng.integers(0, 4, size=(20, 20)), rng.integers(0, 4, size=(10, 20))
    p1, p2 = rng.integers(0, 5, size=(20, 20)), rng.integers(0, 5, size=(10, 20))
    t1[0, :5] = 255
    site1, site2, single = ConfusionMatrix(5, 4), ConfusionMatrix(5, 4), ConfusionMatrix(5, 4)
    site1.update(p1, t1)
    site2.update(p2, t2)
    single.update(np.concatenate([p1, p2]), np.concatenate([t1, t2]))
    merged = ConfusionMatrix.from_dict(json.loads(json.dumps(site1.to_dict()))).merge(site2)
    assert merged.counts.tolist() == single.counts.tolist()
    assert merged.compute() == single.compute()
    assert merged.compute()["num_pixels"] == 600 - 5
    with pytest.raises(ValueError):
        merged.merge(ConfusionMatrix(4, 4))
    merged.reset()
    assert merged.counts.sum() == 0 and math.isnan(merged.compute()["miou"])


def test_image_weighted_mean_counts_every_image_once():
    per_site = {"a": {"miou": 0.2, "pixel_acc": 0.5, "num_images": 3}, "b": {"miou": 0.6, "pixel_acc": 0.9, "num_images": 1}}
    assert image_weighted_mean(per_site) == pytest.approx({"miou": 0.3, "pixel_acc": 0.6})
    assert image_weighted_mean(per_site, ["miou"]) == pytest.approx({"miou": 0.3})
    with pytest.raises(ValueError, match="no validation image"):
        image_weighted_mean({})
