"""Tests of fuss_components.transforms: the whole-image input size, the five training crops and their
normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fuss_components.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_size, eval_view, five_crop_views


@pytest.mark.parametrize("height, width, short_side, patch, expected", [
    (40, 56, 42, 14, (42, 56)),  # 56 * 1.05 = 58.8 = 4.2 patches -> 4
    (480, 640, 448, 14, (448, 602)),  # 640 * 448 / 480 = 597.3 = 42.7 patches -> 43
    (640, 480, 448, 14, (602, 448)),
    (20, 30, 5, 14, (14, 14)),  # less than half a patch rounds to 0: at least one patch
])
def test_eval_size_hand_values(height, width, short_side, patch, expected):
    assert eval_size(height, width, short_side, patch) == expected


def normalised(rgb) -> torch.Tensor:
    """An RGB colour (0..255) as the transforms normalise it."""
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


QUADRANTS = {"top left": (255, 0, 0), "top right": (0, 255, 0), "bottom left": (0, 0, 255),
             "bottom right": (255, 255, 255)}


def quadrant_image(side: int = 20) -> Image.Image:
    half = side // 2
    pixels = np.zeros((side, side, 3), dtype=np.uint8)
    pixels[:half, :half], pixels[:half, half:] = QUADRANTS["top left"], QUADRANTS["top right"]
    pixels[half:, :half], pixels[half:, half:] = QUADRANTS["bottom left"], QUADRANTS["bottom right"]
    return Image.fromarray(pixels)


def test_five_crops_are_the_corners_then_the_centre_normalised():
    """Crop ratio 0.5 of a 20 x 20 image of four coloured quadrants: each corner crop is one quadrant's colour,
    resized to 7 x 7 and ImageNet-normalised; the centre crop holds all four colours, a quarter each."""
    views = five_crop_views(quadrant_image(), crop_ratio=0.5, size=7)
    assert views.shape == (5, 3, 7, 7) and views.dtype == torch.float32
    for view, rgb in zip(views[:4], QUADRANTS.values()):
        expected = normalised(rgb)[:, None, None].expand(3, 7, 7)
        assert torch.allclose(view, expected, atol=1e-5)
    centre = views[4]
    mean_colour = np.mean(list(QUADRANTS.values()), axis=0).tolist()
    assert torch.allclose(centre.mean(dim=(1, 2)), normalised(mean_colour), atol=1e-5)


def test_eval_view_keeps_the_aspect_in_whole_patches():
    image = Image.fromarray(np.full((40, 56, 3), 128, dtype=np.uint8))  # 56 wide, 40 high
    view = eval_view(image, short_side=42, patch=14)
    assert view.shape == (3, 42, 56)
    assert torch.allclose(view, normalised((128, 128, 128))[:, None, None].expand(3, 42, 56), atol=1e-5)
