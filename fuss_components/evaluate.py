"""Whole-image evaluation: cached features -> cluster logits -> upsampled to label size -> Hungarian metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache import FeatureCache
from .crf import dense_crf
from .datasets import SegmentationDataset
from .metrics import ConfusionMatrix
from .transforms import eval_view
from .viz import save_overlay

# Cosine logits lie in [-1, 1]; STEGO feeds its cluster probe's logits scaled by 2 into the CRF's softmax.
CRF_LOGIT_SCALE = 2.0


class Segmenter(Protocol):
    def cluster_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, D', h, w)`` features -> ``(B, C, h, w)`` cluster scores."""


def predict_logits(model: Segmenter, feats: torch.Tensor, size: tuple[int, int],
                   mirror: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster scores of one image's features ``(D', h, w)``, bilinearly upsampled to ``size``; with ``mirror``
    (the mirrored image's features, mirrored back) the mean of both views' scores (``data.eval_flip``)."""
    with torch.no_grad():
        views = feats[None] if mirror is None else torch.stack([feats, mirror])
        logits = model.cluster_logits(views.to(model_device(model)).float()).mean(0, keepdim=True)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]


def model_device(model: Segmenter) -> torch.device:
    """Where a segmenter's parameters live (the CPU for one without tensors): its inputs are moved there."""
    for tensor in (*getattr(model, "parameters", list)(), *getattr(model, "buffers", list)()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def image_logits(model: Segmenter, backbone, image, short_side: int, flip: bool) -> torch.Tensor:
    """Cluster scores ``(C, H, W)`` of one image at its own size, straight from the backbone (what ``fuss predict``
    and an exported model compute; evaluation reads the same features from the cache)."""
    view = eval_view(image, short_side, backbone.patch_size)[None].to(next(backbone.model.parameters()).device)
    if not flip:
        return predict_logits(model, backbone.features(view)[0], image.size[::-1]).cpu()
    feats = backbone.features(torch.cat([view, view.flip(-1)]))  # both views in one batch
    return predict_logits(model, feats[0], image.size[::-1], feats[1].flip(-1)).cpu()


def cached_logits(model: Segmenter, cache: FeatureCache, image_id: str, size: tuple[int, int]) -> torch.Tensor:
    """:func:`predict_logits` of one image's cached evaluation features (both views with ``data.eval_flip``)."""
    mirror = cache.load_mirror(image_id) if "mirror" in cache.eval_kinds else None
    return predict_logits(model, cache.load_eval(image_id), size, mirror)


def evaluate_model(model: Segmenter, dataset: SegmentationDataset, ids: Sequence[str], cache: FeatureCache,
                   num_clusters: int, crf: bool = False, overlay_dir: str | Path | None = None,
                   num_overlays: int = 0, progress: bool = False) -> dict:
    """mIoU, pixel accuracy, per-class IoU and clusters used over ``ids`` (their eval features must be cached).

    With ``crf`` the same metrics after dense CRF are added under ``"crf"``. With ``overlay_dir``, the first
    ``num_overlays`` images are saved as image | prediction | label PNGs (clusters mapped to their matched class).
    """
    if not getattr(dataset, "has_labels", True):  # any object with load_label / num_classes is a labelled dataset
        dataset.require_labels("evaluation (mIoU, pixel accuracy)")
    plain = ConfusionMatrix(num_clusters, dataset.num_classes, dataset.ignore_index)
    refined = ConfusionMatrix(num_clusters, dataset.num_classes, dataset.ignore_index) if crf else None
    for image_id in tqdm(ids, desc="evaluate", unit="img", disable=not progress):
        label = dataset.load_label(image_id)
        logits = cached_logits(model, cache, image_id, label.shape)  # on the model's device
        plain.update(logits.argmax(0).cpu().numpy(), label)
        if refined is not None:  # the CRF runs on the CPU
            image = np.asarray(dataset.load_image(image_id))
            refined.update(dense_crf(image, (logits * CRF_LOGIT_SCALE).cpu().numpy()).argmax(0), label)
    result = plain.compute()
    result["num_images"] = len(ids)
    if refined is not None:
        result["crf"] = refined.compute()
    if overlay_dir is not None and num_overlays > 0:
        assignment = np.asarray(result["assignment"])
        for image_id in ids[:num_overlays]:
            label = dataset.load_label(image_id)
            pred = cached_logits(model, cache, image_id, label.shape).argmax(0).cpu().numpy()
            mapped = np.where(assignment[pred] >= 0, assignment[pred], dataset.ignore_index).astype(np.uint8)
            save_overlay(Path(overlay_dir) / f"{image_id}.png", np.asarray(dataset.load_image(image_id)), mapped,
                         label)
    return result
