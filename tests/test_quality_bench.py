"""benchmarks/quality.py: the scorer behind the development-split variants table."""

import numpy as np
import torch

from benchmarks.quality import Scorer


def test_scorer_matches_one_to_one_and_over_clusters_many_to_one():
    # 2 classes on a 2 x 4 label; codes point along 3 axes: axes 0 and 1 cover class 0, axis 2 class 1
    label = np.array([[0, 0, 0, 0], [1, 1, 1, 1]], dtype=np.uint8)
    code = torch.zeros(3, 2, 4)
    code[0, 0, :2] = 1
    code[1, 0, 2:] = 1
    code[2, 1, :] = 1
    eye = torch.eye(3)
    scorer = Scorer({"two": eye[[0, 2]], "three": eye}, num_classes=2, upsample="logits")
    scorer.add(code, label)
    scores = scorer.results()
    # two centroids: axis-1 pixels are nearest to neither exactly; cos 0 to both -> argmax picks index 0 (class 0)
    assert scores["two"]["miou"] == 1.0
    # three clusters, many-to-one: clusters 0 and 1 both map to class 0, so the merge is perfect too
    assert scores["three"]["miou"] == 1.0 and scores["three"]["clusters_used"] == 2


def test_scorer_counts_unmatched_pixels_as_errors():
    label = np.zeros((2, 2), dtype=np.uint8)
    label[1] = 1
    code = torch.zeros(2, 2, 2)
    code[0] = 1  # every pixel nearest to centroid 0
    scorer = Scorer({"c": torch.eye(2)}, num_classes=2, upsample="codes")
    scorer.add(code, label)
    r = scorer.results()["c"]
    assert r["pixel_acc"] == 0.5 and abs(r["miou"] - 0.25) < 1e-9  # class 0 IoU 0.5, class 1 IoU 0
