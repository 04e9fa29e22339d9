"""Tests of fuss_components.viz: the palette, colourised masks, overlays, the three-panel PNG and legends."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fuss_components.viz import colorize, legend, overlay, overlay_with_legend, palette, save_overlay

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


def _rows_of(panel, colour):
    """The row indices where the panel holds this exact colour."""
    return np.flatnonzero(np.all(panel == np.asarray(colour, np.uint8), axis=2).any(axis=1))


def test_legend_swatches_in_order_and_size_grows_with_text():
    colours = palette(3)
    panel = legend(colours[[0, 2]], ["road", "sky"], font_size=12)
    assert panel.dtype == np.uint8 and panel.shape[2] == 3
    assert panel[0, 0].tolist() == [255, 255, 255]  # white background
    road, sky = _rows_of(panel, colours[0]), _rows_of(panel, colours[2])
    # each swatch is a 12 px square with a 1 px outline: 10 rows of its solid colour, road above sky
    assert len(road) == 10 and len(sky) == 10 and road.max() < sky.min()
    assert np.all(panel == colours[0], axis=2).sum() == 100
    assert len(_rows_of(panel, colours[1])) == 0  # cluster 1 is not listed
    wider = legend(colours[[0, 2]], ["road", "sky with a much longer name"], font_size=12)
    assert wider.shape[0] == panel.shape[0] and wider.shape[1] > panel.shape[1]
    assert legend(colours, ["a", "b", "c"], font_size=12).shape[0] > panel.shape[0]
    with pytest.raises(ValueError, match="2 colours but 1 labels"):
        legend(colours[:2], ["a"])


def test_overlay_with_legend_lists_present_clusters_beside_the_overlay():
    image, truth, _ = two_halves(40, 30)
    mask = truth * 2  # clusters 0 and 2 present, 1 absent
    names = ["road", "car", "sky"]
    out = overlay_with_legend(image, mask, names, font_size=12)
    panel = legend(palette(3)[[0, 2]], ["road  50.0%", "sky  50.0%"], font_size=12)
    assert out.shape == (max(40, panel.shape[0]), 30 + panel.shape[1], 3)
    np.testing.assert_array_equal(out[:40, :30], overlay(image, mask, palette=palette(3)))
    np.testing.assert_array_equal(out[:panel.shape[0], 30:], panel)
    assert len(_rows_of(out[:, 30:], palette(3)[1])) == 0
    # a small image gets a legend taller than itself: white below the overlay
    small = overlay_with_legend(image[:8, :8], mask[:8, :8], names, font_size=12)
    assert small.shape[0] > 8 and np.all(small[8:, :8] == 255)
    with pytest.raises(ValueError, match="no colour"):
        overlay_with_legend(image, mask, names[:2])
