"""Tests of fuss_components.evaluate: cluster scores upsampled to the label's size, and the metrics, overlays and
image count of ``evaluate_model`` on two hand-made 4 x 4 images (a stand-in dataset and feature cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fuss_components.evaluate import evaluate_model, predict_logits

IGNORE = 255
# image "a": class 0 on the left half, class 1 on the right; image "b": class 2 on top, the bottom half ignored
LABELS = {
    "a": np.array([[0, 0, 1, 1]] * 4, dtype=np.uint8),
    "b": np.array([[2] * 4] * 2 + [[IGNORE] * 4] * 2, dtype=np.uint8),
}


class FeaturesAreScores:
    """A segmenter whose cluster scores are the features themselves."""

    def cluster_logits(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


class HandDataset:
    """What ``evaluate_model`` reads of a dataset: classes, ignore index, labels, images."""

    num_classes = 3
    ignore_index = IGNORE

    def load_label(self, image_id: str) -> np.ndarray:
        return LABELS[image_id]

    def load_image(self, image_id: str) -> Image.Image:
        return Image.fromarray(np.full((4, 4, 3), 90 if image_id == "a" else 160, dtype=np.uint8))


class HandCache:
    """What ``evaluate_model`` reads of a feature cache: one ``(C, h, w)`` map per image."""

    eval_kinds = ("eval",)  # no mirror view (data.eval_flip off)

    def __init__(self, maps: dict[str, torch.Tensor]):
        self.maps = maps

    def load_eval(self, image_id: str) -> torch.Tensor:
        return self.maps[image_id]


def one_hot(clusters: list[list[int]], num_clusters: int = 3) -> torch.Tensor:
    """``(C, h, w)`` map scoring 1 for the given cluster of each position, 0 for the others."""
    index = torch.tensor(clusters)
    return torch.nn.functional.one_hot(index, num_clusters).permute(2, 0, 1).half()


def test_predict_logits_upsamples_bilinearly_to_the_label_size():
    feats = torch.tensor([[[0.0, 1.0]], [[2.0, 2.0]]])  # (2 clusters, 1, 2)
    logits = predict_logits(FeaturesAreScores(), feats, (3, 4))
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, 4)
    # half-pixel centres, edges clamped: 0, 1/4, 3/4, 1 along each row
    assert logits[0].tolist() == [[0.0, 0.25, 0.75, 1.0]] * 3
    assert logits[1].tolist() == [[2.0] * 4] * 3


def test_predict_logits_with_a_mirror_view_average_both_views_scores():
    feats = torch.tensor([[[0.0, 1.0]], [[2.0, 2.0]]])
    mirror = torch.tensor([[[1.0, 1.0]], [[0.0, 4.0]]])
    logits = predict_logits(FeaturesAreScores(), feats, (1, 2), mirror)
    assert logits.tolist() == [[[0.5, 1.0]], [[1.0, 3.0]]]


def test_clusters_that_are_a_relabelling_of_the_classes_score_one():
    """Cluster (class + 1) mod 3 everywhere, on 2 x 2 maps that the upsampling brings to the 4 x 4 labels."""
    cache = HandCache({"a": one_hot([[1, 2], [1, 2]]), "b": one_hot([[0, 0], [0, 0]])})
    result = evaluate_model(FeaturesAreScores(), HandDataset(), ["a", "b"], cache, num_clusters=3)
    assert (result["miou"], result["pixel_acc"]) == (1.0, 1.0)
    assert result["per_class_iou"] == [1.0, 1.0, 1.0]
    assert result["assignment"] == [2, 0, 1]  # cluster -> class
    assert (result["num_images"], result["num_pixels"], result["clusters_used"]) == (2, 24, 3)
    assert "crf" not in result


def test_one_cluster_everywhere_scores_one_matched_class():
    """24 valid pixels, 8 per class: cluster 0 matches one class (IoU 8 / 24), the two others score 0."""
    cache = HandCache({i: one_hot([[0] * 4] * 4) for i in LABELS})
    result = evaluate_model(FeaturesAreScores(), HandDataset(), ["a", "b"], cache, num_clusters=3)
    assert result["pixel_acc"] == pytest.approx(1 / 3)
    assert result["miou"] == pytest.approx(1 / 9)
    assert sorted(result["per_class_iou"]) == pytest.approx([0.0, 0.0, 1 / 3])
    assert result["clusters_used"] == 1


def test_overlays_show_the_prediction_mapped_to_classes(tmp_path):
    """With a perfect relabelling the prediction panel, after mapping clusters to classes, equals the label panel;
    only the first ``num_overlays`` images are drawn."""
    cache = HandCache({"a": one_hot([[1, 1, 2, 2]] * 4), "b": one_hot([[0] * 4] * 4)})
    evaluate_model(FeaturesAreScores(), HandDataset(), ["a", "b"], cache, num_clusters=3, overlay_dir=tmp_path,
                   num_overlays=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    with Image.open(tmp_path / "a.png") as im:
        panels = np.array(im.convert("RGB"))
    assert panels.shape == (4, 12, 3)  # image | prediction | label
    assert (panels[:, :4] == 90).all()
    np.testing.assert_array_equal(panels[:, 4:8], panels[:, 8:])
    assert not np.array_equal(panels[:, 4:6], panels[:, 6:8])  # the two classes have different colours
