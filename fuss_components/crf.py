"""Dense CRF refinement of segmentation logits (pydensecrf, PyPI package ``pydensecrf2``) with STEGO's
parameters: unary = -log softmax(logits), 10 mean-field iterations, Gaussian kernel (sxy=1, compat=3) and
bilateral kernel (sxy=67, srgb=3, compat=4)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["dense_crf", "MAX_ITER", "GAUSSIAN_SXY", "GAUSSIAN_COMPAT", "BILATERAL_SXY", "BILATERAL_SRGB",
           "BILATERAL_COMPAT"]

# STEGO's settings (spec section 4).
MAX_ITER = 10
GAUSSIAN_SXY = 1
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 67
BILATERAL_SRGB = 3
BILATERAL_COMPAT = 4


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over axis 0, in float64."""
    z = logits.astype(np.float64) - logits.max(axis=0, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=0, keepdims=True)
    return z


def dense_crf(
    image: np.ndarray,
    logits: Any,
    *,
    iterations: int = MAX_ITER,
    gaussian_sxy: float = GAUSSIAN_SXY,
    gaussian_compat: float = GAUSSIAN_COMPAT,
    bilateral_sxy: float = BILATERAL_SXY,
    bilateral_srgb: float = BILATERAL_SRGB,
    bilateral_compat: float = BILATERAL_COMPAT,
) -> np.ndarray:
    """Refine per-pixel class scores with a fully connected CRF.

    Args:
        image: ``uint8`` RGB image ``(H, W, 3)`` (numpy, or a torch tensor that is converted).
        logits: float scores ``(C, H, W)`` (numpy array or torch tensor, any device). They must already be at
            the image's resolution: upsample low-resolution head output (e.g. bilinear) before calling; this
            function does not resize. The unary term is built from ``softmax(logits)`` over ``C``.
        iterations, gaussian_*, bilateral_*: CRF parameters; the defaults are STEGO's and are what the spec
            asks for. Keyword-only, so that callers do not change them by accident.

    Returns:
        ``float32`` array ``(C, H, W)``: the CRF's marginal probabilities (sum to 1 over ``C`` per pixel). Take
        ``argmax(axis=0)`` for labels.

    Raises:
        ValueError / TypeError: wrong ranks, a non-RGB or non-``uint8`` image, ``H, W`` mismatch, non-finite
        logits.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    if hasattr(logits, "detach") and hasattr(logits, "cpu"):
        logits = logits.detach().float().cpu().numpy()
    if hasattr(image, "detach") and hasattr(image, "cpu"):
        image = image.detach().cpu().numpy()
    logits = np.asarray(logits)
    image = np.asarray(image)

    if logits.ndim != 3:
        raise ValueError(f"logits must be (C, H, W), got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (channels-first? pass (H, W, 3))" if image.ndim == 3 and image.shape[0] == 3 else ""
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}{hint}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got dtype {image.dtype}")
    c, h, w = logits.shape
    if image.shape[:2] != (h, w):
        raise ValueError(
            f"image is {image.shape[0]}x{image.shape[1]} (HxW) but logits are {h}x{w}: upsample the logits "
            f"to the image resolution first"
        )
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"empty logits of shape {logits.shape}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or inf")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")

    probs = _softmax(logits).astype(np.float32)
    unary = np.ascontiguousarray(unary_from_softmax(probs), dtype=np.float32)  # (C, H*W), -log p
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)  # pydensecrf needs a writable buffer

    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb, compat=bilateral_compat)
    q = crf.inference(int(iterations))
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)
