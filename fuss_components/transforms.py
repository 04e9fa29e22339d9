"""Image -> backbone input tensors: five-crop training views and whole-image evaluation views."""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    tensor = TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


def five_crop_views(image: Image.Image, crop_ratio: float, size: int) -> torch.Tensor:
    """Four corner crops and the centre crop (side = crop_ratio * short side), each resized to size x size.

    Returns ``(5, 3, size, size)``, ImageNet-normalised.
    """
    tensor = _to_normalized_tensor(image)
    side = max(1, int(round(crop_ratio * min(tensor.shape[-2:]))))
    crops = TF.five_crop(tensor, [side, side])
    return torch.stack([TF.resize(c, [size, size], antialias=True) for c in crops])


def eval_size(height: int, width: int, short_side: int, patch: int) -> tuple[int, int]:
    """Whole-image input size: the short side becomes ``short_side`` and both sides a multiple of ``patch``."""
    scale = short_side / min(height, width)
    return (max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch))


def eval_view(image: Image.Image, short_side: int, patch: int) -> torch.Tensor:
    """The whole image resized (aspect kept, sides multiples of ``patch``): ``(3, h, w)``."""
    tensor = _to_normalized_tensor(image)
    return TF.resize(tensor, list(eval_size(*tensor.shape[-2:], short_side, patch)), antialias=True)
