"""Unsupervised segmentation metrics: a clusters x classes confusion matrix, Hungarian matching of clusters to
classes, then per-class IoU, mean IoU, pixel accuracy and the number of clusters in use.

Convention (spec section 4). After matching, the predicted class of a pixel is ``assignment[cluster]``; a
pixel whose cluster is unmatched (``-1``, possible when there are more clusters than classes) is predicted as
*no* class. Such pixels are NOT dropped: they stay in the denominator of the pixel accuracy and are false
negatives of their true class, and they are a true positive or false positive of no class. With

    TP_c = pixels of class c predicted as c
    FP_c = pixels predicted as c whose class is not c
    FN_c = pixels of class c not predicted as c (unmatched-cluster pixels included)

``IoU_c = TP_c / (TP_c + FP_c + FN_c)``. A class that is neither present in the (valid) target nor predicted
has ``0 / 0``: its IoU is reported as ``nan`` and it is excluded from the mean. A class that is present but
never predicted (or predicted but absent) has IoU 0 and counts in the mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["ConfusionMatrix", "hungarian_match", "image_weighted_mean"]


def hungarian_match(confusion: np.ndarray) -> np.ndarray:
    """Match clusters to classes one-to-one so that the number of matched pixels is maximal.

    Args:
        confusion: ``(num_clusters, num_classes)`` non-negative counts; ``confusion[k, c]`` is the number of
            pixels of class ``c`` predicted as cluster ``k``. The two sizes may differ.

    Returns:
        ``int64`` array of length ``num_clusters``: the class matched to each cluster, or ``-1`` for a cluster
        left unmatched (only possible when ``num_clusters > num_classes``). Solved with
        ``scipy.optimize.linear_sum_assignment(..., maximize=True)``; ties are resolved by scipy's
        deterministic solver, so equal input gives equal output.
    """
    m = np.asarray(confusion)
    if m.ndim != 2:
        raise ValueError(f"confusion must be 2-D (num_clusters, num_classes), got shape {m.shape}")
    if m.size and (not np.all(np.isfinite(m)) or np.any(m < 0)):
        raise ValueError("confusion must hold finite, non-negative counts")
    assignment = np.full(m.shape[0], -1, dtype=np.int64)
    if m.size == 0:
        return assignment
    rows, cols = linear_sum_assignment(m.astype(np.float64), maximize=True)
    assignment[rows] = cols
    return assignment


def image_weighted_mean(per_site: Mapping[str, Mapping[str, Any]],
                        keys: Iterable[str] = ("miou", "pixel_acc")) -> dict[str, float]:
    """The mean of each of ``keys`` over sites, each site weighted by its ``num_images``: the figure of one
    evaluation over all validation sites' images (a site with few images counts for little).

    ValueError when there is no site or no image."""
    total = sum(m["num_images"] for m in per_site.values())
    if total <= 0:
        raise ValueError("image-weighted mean over no validation image")
    return {key: sum(float(m[key]) * m["num_images"] for m in per_site.values()) / total for key in keys}


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """numpy view of a numpy array or torch tensor (any device), without importing torch eagerly."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    return arr


class ConfusionMatrix:
    """Accumulates a ``(num_clusters, num_classes)`` confusion matrix over many images (or sites).

    Args:
        num_clusters: number of predicted cluster ids, valid ids are ``0..num_clusters-1``.
        num_classes: number of ground-truth classes, valid ids are ``0..num_classes-1``.
        ignore_index: target value excluded from all counts (``None``: nothing is ignored). It must lie
            outside ``[0, num_classes)``.

    ``counts`` holds the raw ``int64`` matrix (rows = clusters, columns = classes).
    """

    def __init__(self, num_clusters: int, num_classes: int, ignore_index: int | None = 255) -> None:
        if int(num_clusters) < 1 or int(num_classes) < 1:
            raise ValueError(f"num_clusters and num_classes must be >= 1, got {num_clusters}, {num_classes}")
        if ignore_index is not None and 0 <= int(ignore_index) < int(num_classes):
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (num_classes={num_classes})")
        self.num_clusters = int(num_clusters)
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.counts = np.zeros((self.num_clusters, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        """Set all counts back to zero."""
        self.counts[...] = 0

    def update(self, pred: Any, target: Any) -> None:
        """Add one batch: ``pred`` (cluster ids) and ``target`` (class ids) of the same shape.

        Both may be numpy arrays or torch tensors of any integer dtype and any (equal) shape. Pixels whose
        target equals ``ignore_index`` are skipped, whatever their prediction (so a prediction may carry e.g.
        255 there). Among the remaining pixels, a cluster id outside ``[0, num_clusters)`` or a class id
        outside ``[0, num_classes)`` raises ``ValueError`` naming the offending values.
        """
        p = _to_numpy(pred, "pred")
        t = _to_numpy(target, "target")
        if p.shape != t.shape:
            raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
        p = p.reshape(-1).astype(np.int64, copy=False)
        t = t.reshape(-1).astype(np.int64, copy=False)
        if self.ignore_index is not None:
            valid = t != self.ignore_index
            if not valid.all():
                p = p[valid]
                t = t[valid]
        if p.size == 0:
            return
        bad_t = (t < 0) | (t >= self.num_classes)
        if bad_t.any():
            raise ValueError(
                f"target holds class ids outside [0, {self.num_classes}) (ignore_index={self.ignore_index}): "
                f"{np.unique(t[bad_t])[:20].tolist()}"
            )
        bad_p = (p < 0) | (p >= self.num_clusters)
        if bad_p.any():
            raise ValueError(
                f"pred holds cluster ids outside [0, {self.num_clusters}) on valid pixels: "
                f"{np.unique(p[bad_p])[:20].tolist()}"
            )
        flat = np.bincount(p * self.num_classes + t, minlength=self.num_clusters * self.num_classes)
        self.counts += flat.reshape(self.num_clusters, self.num_classes)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add the counts of ``other`` (same sizes and ignore index) into this matrix; returns ``self``."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if (other.num_clusters, other.num_classes) != (self.num_clusters, self.num_classes):
            raise ValueError(
                f"cannot merge a {other.num_clusters}x{other.num_classes} matrix into a "
                f"{self.num_clusters}x{self.num_classes} one"
            )
        if other.ignore_index != self.ignore_index:
            raise ValueError(f"ignore_index differs: {other.ignore_index} vs {self.ignore_index}")
        self.counts += other.counts
        return self

    def to_dict(self) -> dict:
        """Raw counts and sizes as plain JSON-serialisable Python values (see ``from_dict``)."""
        return {
            "num_clusters": self.num_clusters,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "counts": self.counts.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ConfusionMatrix":
        """Rebuild a matrix from ``to_dict`` output, checking the counts' shape and values."""
        cm = cls(d["num_clusters"], d["num_classes"], d.get("ignore_index", 255))
        counts = np.asarray(d["counts"], dtype=np.int64)
        if counts.shape != cm.counts.shape:
            raise ValueError(f"counts shape {counts.shape} does not match {cm.counts.shape}")
        if np.any(counts < 0):
            raise ValueError("counts must be non-negative")
        cm.counts[...] = counts
        return cm

    def compute(self) -> dict:
        """Hungarian-match clusters to classes and score.

        Returns a dict with
            ``miou``: mean over classes of IoU (classes absent from target and never predicted excluded), in
            [0, 1]; ``pixel_acc``: matched-correct pixels / all valid pixels (unmatched-cluster pixels count as
            wrong); ``per_class_iou``: list of length ``num_classes`` (``nan`` for excluded classes);
            ``assignment``: list, class per cluster or -1; ``clusters_used``: clusters predicted on at least one
            valid pixel; ``num_pixels``: valid pixels counted.
        With no valid pixel at all, ``miou`` and ``pixel_acc`` are ``nan``.
        """
        m = self.counts
        assignment = hungarian_match(m)
        total = int(m.sum())
        gt = m.sum(axis=0)  # pixels per true class (all clusters, matched or not)
        tp = np.zeros(self.num_classes, dtype=np.int64)
        pred = np.zeros(self.num_classes, dtype=np.int64)  # pixels predicted as each class after matching
        matched = np.nonzero(assignment >= 0)[0]
        cls_of = assignment[matched]
        tp[cls_of] = m[matched, cls_of]
        pred[cls_of] = m[matched].sum(axis=1)
        union = gt + pred - tp  # = TP + FP + FN
        iou = np.full(self.num_classes, np.nan)
        nz = union > 0
        iou[nz] = tp[nz] / union[nz]
        miou = float(np.mean(iou[nz])) if nz.any() else math.nan
        pixel_acc = float(tp.sum() / total) if total > 0 else math.nan
        return {
            "miou": miou,
            "pixel_acc": pixel_acc,
            "per_class_iou": [float(v) for v in iou],
            "assignment": [int(a) for a in assignment],
            "clusters_used": int(np.count_nonzero(m.sum(axis=1))),
            "num_pixels": total,
        }

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_clusters={self.num_clusters}, num_classes={self.num_classes}, "
            f"ignore_index={self.ignore_index}, num_pixels={int(self.counts.sum())})"
        )
