"""Tests of fuss_components.viz: the palette, colourised masks, overlays and the three-panel PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fuss_components.viz import colorize, overlay, palette, save_overlay

from conftest import two_halves


def test_palette_is_distinct_deterministic_and_prefix_stable():
    p = palette(300)
    assert p.shape == (300, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p.tolist()}) == 300
    assert not np.any(np.all(p == 0, axis=1))  # black is reserved for ignore
    np.testing.assert_array_equal(p[:27], palette(27))
    np.testing.assert_array_equal(palette(300), p)


def test_colorize_ignore_black_and_distinct_ids():
    mask = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    rgb = colorize(mask)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[1, 0].tolist() == [0, 0, 0]
    assert rgb[0, 0].tolist() != rgb[0, 1].tolist()
    assert rgb[0, 1].tolist() == rgb[1, 1].tolist()
    assert rgb[0, 0].tolist() == palette(2)[0].tolist()
    with pytest.raises(ValueError, match="no colour"):
        colorize(np.array([[0, 5]]), palette=palette(3))


def test_overlay_blends_and_keeps_ignored_pixels():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 0], [255, 0]])
    out = overlay(image, mask, alpha=0.5)
    colour = palette(1)[0].astype(np.float64)
    np.testing.assert_array_equal(out[0, 0], np.rint(0.5 * 100 + 0.5 * colour).astype(np.uint8))
    assert out[1, 0].tolist() == [100, 100, 100]
    np.testing.assert_array_equal(overlay(image, mask, alpha=0.0), image)


def test_save_overlay_writes_three_panels(tmp_path):
    image, truth, _ = two_halves(12, 10)
    pred = 1 - truth
    path = save_overlay(tmp_path / "a" / "b" / "x.png", image, pred, label=truth)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (30, 12)  # (width, height): 3 panels of width 10
        arr = np.array(im.convert("RGB"))
    np.testing.assert_array_equal(arr[:, :10], image)  # first panel is the plain image
    path2 = save_overlay(tmp_path / "y.png", image, pred)
    with Image.open(path2) as im:
        assert im.size == (20, 12)
    with pytest.raises(ValueError, match="sizes differ"):
        save_overlay(tmp_path / "z.png", image, pred[:5])
